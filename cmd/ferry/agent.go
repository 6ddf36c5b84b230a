package main

import (
	"context"
	"io"
)

// runAgent runs both roles in one process, on one listener: SourceAgent,
// DestAgent and Transfer. This is what the DaemonSet runs on every node: a
// node is the source of one VM's migration and the destination of
// another's. One process means one device registry, so a device is lent to
// one role at a time (a second claim is DEVICE_BUSY, not a fight between
// two processes over the VFIO fd), one port for the control plane and the
// peers, one health port, one metrics endpoint, one memory limit and one
// drain.
func runAgent(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return runRoles(ctx, "agent", "--listen ADDR (--insecure | --tls-cert FILE --tls-key FILE --tls-ca FILE --allow-client ID... --allow-peer ID...) [--devices PATTERN...] [--allow-sim] [--max-buffers N] [--max-buffer-bytes SIZE] [--memory-budget SIZE] [--source-timeout D] [--reconnect-timeout D] [--progress-timeout D] [--data-listen ADDR] [--metrics-listen ADDR] [--health-listen ADDR] [--drain-timeout D]",
		"127.0.0.1:7100", roles{source: true, dest: true}, args, stderr)
}
