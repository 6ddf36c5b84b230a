package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// preflightHelp is what `ferry help preflight` says beyond the flags.
const preflightHelp = `
Preflight asks, before a VM pays for it, whether each source device's
state can go into the destination device named for it. The source agent
describes its devices (kind, PCI ids, driver and version, mdev type,
migration flags; DescribeDevices) and the destination agent compares
them with its own and with what the migration needs (P2P when every
source device has it, PRE_COPY for --mode precopy), its features and its
memory budget (Preflight). Nothing changes any device's state. It exits
0 when every pair is compatible and 1 otherwise, naming what differs.
'ferry migrate' runs the same check when the session opens, before any
device stops; --preflight there refuses a destination that cannot check.
`

func runPreflight(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("preflight", stderr, "--source ADDR --dest ADDR --src-device SPEC --dest-device SPEC [...] [--mode stopcopy|precopy] (--insecure | --tls-cert FILE --tls-key FILE --tls-ca FILE) [--json]")
	usage := fs.Usage
	fs.Usage = func() {
		usage()
		fmt.Fprint(fs.Output(), preflightHelp)
	}
	var pf pairFlags
	pf.register(fs)
	mode := fs.String("mode", "stopcopy", "the migration's mode: stopcopy or precopy")
	var sec clientSecurityFlags
	sec.register(fs)
	asJSON := fs.Bool("json", false, "print the verdict as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := pf.check(); err != nil {
		return err
	}
	if *mode != "stopcopy" && *mode != "precopy" {
		return usageError(fmt.Errorf("--mode %q: want stopcopy or precopy", *mode))
	}
	sourceAddr, destAddr, srcDevs, dstDevs := pf.source, pf.dest, pf.src, pf.dst
	req := &ferryv1.PreflightRequest{Mode: ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY,
		Features: []ferryv1.Feature{ferryv1.Feature_FEATURE_COMMIT, ferryv1.Feature_FEATURE_DEVICE_CHECK}}
	if *mode == "precopy" {
		req.Mode = ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY
		req.Features = append(req.Features, ferryv1.Feature_FEATURE_PRECOPY)
	}
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()

	sconn, screds, err := sec.dial(*sourceAddr)
	if err != nil {
		return err
	}
	defer sconn.Close()
	described, err := ferryv1.NewSourceAgentClient(sconn).DescribeDevices(cctx, &ferryv1.DescribeDevicesRequest{Devices: srcDevs})
	if err != nil {
		return newCallError("describe the source devices at "+*sourceAddr, err, screds)
	}
	for i, d := range described.GetDevices() {
		req.Devices = append(req.Devices, &ferryv1.PreflightPair{Source: d, DestDevice: dstDevs[i]})
	}
	dconn, dcreds, err := sec.dial(*destAddr)
	if err != nil {
		return err
	}
	defer dconn.Close()
	resp, err := ferryv1.NewDestAgentClient(dconn).Preflight(cctx, req)
	if err != nil {
		return newCallError("preflight at "+*destAddr, err, dcreds)
	}

	if *asJSON {
		b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(resp)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s\n", b)
	} else {
		verdict := "compatible"
		if !resp.GetCompatible() {
			verdict = "NOT compatible"
		}
		fmt.Fprintf(stdout, "preflight: %s (source Ferry %s, destination Ferry %s)\n", verdict, described.GetAgentVersion(), resp.GetAgentVersion())
		if e := resp.GetError(); e != nil {
			fmt.Fprintf(stdout, "  %s: %s\n", e.GetReason(), e.GetMessage())
		}
		for i, v := range resp.GetDevices() {
			if v.GetCompatible() {
				fmt.Fprintf(stdout, "  %s -> %s: compatible\n", srcDevs[i], v.GetDestDevice())
				continue
			}
			fmt.Fprintf(stdout, "  %s -> %s: %s (%s)\n", srcDevs[i], v.GetDestDevice(), v.GetError().GetMessage(), v.GetError().GetReason())
		}
	}
	if !resp.GetCompatible() {
		return &exitError{code: 1}
	}
	return nil
}
