package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// runSwitchover asks the source agent to switch a pre-copy migration over
// (SourceAgent.Switchover): `ferry migrate --mode precopy` streams while
// the VM runs until then. Without --force the source switches over once
// the migration is READY (at once when it is).
func runSwitchover(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("switchover", stderr, "--source ADDR --id ID [--force] (--insecure | --tls-cert FILE --tls-key FILE --tls-ca FILE)")
	addr := fs.String("source", "", "the source agent's address (host:port)")
	id := fs.String("id", "", "the migration id")
	force := fs.Bool("force", false, "switch over now, before the destination has loaded the initial data (READY): the devices then stop with more state left to move")
	var sec clientSecurityFlags
	sec.register(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if *addr == "" || *id == "" {
		return usageError(errors.New("--source and --id are required"))
	}
	conn, creds, err := sec.dial(*addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	resp, err := ferryv1.NewSourceAgentClient(conn).Switchover(cctx, &ferryv1.SwitchoverRequest{MigrationId: *id, Force: *force})
	if err != nil {
		return newCallError("switch "+*id+" over at "+*addr, err, creds)
	}
	_, err = fmt.Fprintf(stdout, "migration %s: switchover asked (%s)\n", *id, phaseName(resp.GetMigration().GetPhase()))
	return err
}
