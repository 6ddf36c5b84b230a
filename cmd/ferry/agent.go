package main

import (
	"context"
	"io"

	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/source"
	"github.com/vfio-ferry/ferry/services/wire"
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
	fs := newFlagSet("agent", stderr, "--listen ADDR (--insecure | --tls-cert FILE --tls-key FILE --tls-ca FILE --allow-client ID... --allow-peer ID...) [--devices PATTERN...] [--allow-sim] [--max-buffers N] [--max-buffer-bytes SIZE] [--memory-budget SIZE] [--metrics-listen ADDR] [--health-listen ADDR] [--drain-timeout D]")
	var af agentFlags
	af.register(fs, "127.0.0.1:7100")
	af.sec.register(fs, true)
	var df destFlags
	df.register(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg, err := df.config()
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	log, err := af.log.logger(stderr)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	creds, peerCreds, err := af.creds()
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	reg := vfio.NewRegistry(af.sec.registry(af.allowSim))
	defer reg.Close()
	pool := wire.NewPool()
	metrics, promReg := af.metrics()
	cfg.Registry, cfg.Pool, cfg.Logger, cfg.Metrics = reg, pool, log, metrics
	dagent, err := dest.New(cfg)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	defer dagent.Close()
	sagent, err := source.New(source.Config{Registry: reg, Pool: pool, Logger: log, PeerCreds: peerCreds, Metrics: metrics})
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	defer sagent.Close()
	metrics.WatchBudget(promReg, dagent.BudgetInUse, uint64(df.budget))
	// The source closes first: its rollback tells the peer destinations.
	return serve(ctx, &af, creds, pool, log, "agent", metrics, promReg, sagent, dagent)
}
