package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/size"
	"github.com/vfio-ferry/ferry/services/source"
)

// runBandwidth changes a running migration's bandwidth limit
// (SourceAgent.SetBandwidth): `ferry bandwidth --source ADDR --id ID
// 500MB/s`, or `none` (or 0) to lift it so the migration finishes at the
// link's rate.
func runBandwidth(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("bandwidth", stderr, "--source ADDR --id ID RATE|none (--insecure | --tls-cert FILE --tls-key FILE --tls-ca FILE) [--json]")
	addr := fs.String("source", "", "the source agent's address (host:port)")
	id := fs.String("id", "", "the migration id")
	asJSON := fs.Bool("json", false, "print the migration's limits as one JSON object")
	var sec clientSecurityFlags
	sec.register(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if *addr == "" || *id == "" || fs.NArg() != 1 {
		return usageError(errors.New("--source, --id and one RATE (e.g. 2Gbit/s, 250MB/s, or none) are required"))
	}
	bps, err := parseLimit(fs.Arg(0))
	if err != nil {
		return usageError(err)
	}
	conn, creds, err := sec.dial(*addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	resp, err := ferryv1.NewSourceAgentClient(conn).SetBandwidth(cctx, &ferryv1.SetBandwidthRequest{MigrationId: *id, MaxBandwidth: bps})
	if err != nil {
		return newCallError("set the bandwidth of "+*id+" at "+*addr, err, creds)
	}
	m := resp.GetMigration()
	if *asJSON {
		return json.NewEncoder(stdout).Encode(struct {
			MigrationID      string `json:"migration_id"`
			MaxBandwidth     uint64 `json:"max_bandwidth"`
			NodeMaxBandwidth uint64 `json:"node_max_bandwidth"`
		}{m.GetId(), m.GetMaxBandwidth(), m.GetNodeMaxBandwidth()})
	}
	_, err = fmt.Fprintf(stdout, "migration %s: bandwidth limit %s (node-wide %s)\n", *id, limitString(m.GetMaxBandwidth()), limitString(m.GetNodeMaxBandwidth()))
	return err
}

// parseLimit reads a bandwidth limit: a rate, or none or 0 for no limit.
func parseLimit(s string) (uint64, error) {
	if s == "none" || s == "0" {
		return 0, nil
	}
	bps, err := size.ParseRate(s)
	if err != nil {
		return 0, err
	}
	if bps < source.MinBandwidth {
		return 0, fmt.Errorf("a bandwidth limit must be at least %s (or none)", size.FormatRate(source.MinBandwidth))
	}
	return bps, nil
}

// limitString prints a limit in bytes per second, 0 as none.
func limitString(bps uint64) string {
	if bps == 0 {
		return "none"
	}
	return size.FormatRate(float64(bps))
}
