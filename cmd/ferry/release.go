package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// releaseHelp is what `ferry help release` says beyond the flags.
const releaseHelp = `
After a verified migration the source device rests in STOP (and a device
whose rollback failed may rest in ERROR): the VM it served runs on the
destination now. Release gives such a device back for a new VM on the
source host: the source agent moves it to RUNNING, or resets it with
--reset (also when the move to RUNNING fails), and lets go of it (closes
it), so the new VM's VMM can open it. A device a migration still holds is
refused (FAILED_PRECONDITION, DEVICE_BUSY).

With --dest, the destination agent lets go of a device it opened by spec
(it keeps devices open after their migrations, so a verified state stays
loaded). The kernel ends a device's state when its last descriptor
closes (vfio-pci resets the function): to hand a loaded device to its VM
without losing it, let the VMM lend the device over the agent's
--vmm-socket instead (see 'ferry vmm').
`

func runRelease(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("release", stderr, "(--source ADDR | --dest ADDR) DEVICE [--reset] (--insecure | --tls-cert FILE --tls-key FILE --tls-ca FILE) [--json]")
	usage := fs.Usage
	fs.Usage = func() {
		usage()
		fmt.Fprint(fs.Output(), releaseHelp)
	}
	srcAddr := fs.String("source", "", "the source agent's address (host:port)")
	dstAddr := fs.String("dest", "", "the destination agent's address (host:port): let go of one of its devices")
	reset := fs.Bool("reset", false, "reset the device instead of moving it to RUNNING (with --dest: reset it before letting go)")
	var sec clientSecurityFlags
	sec.register(fs)
	asJSON := fs.Bool("json", false, "print the device as JSON")
	rest, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	switch {
	case (*srcAddr == "") == (*dstAddr == ""):
		return usageError(errors.New("give one of --source and --dest"))
	case len(rest) != 1:
		return usageError(fmt.Errorf("give one DEVICE, the spec of the device (got %d arguments)", len(rest)))
	}
	device := rest[0]
	addr := srcAddr
	if *dstAddr != "" {
		addr = dstAddr
	}
	conn, creds, err := sec.dial(*addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	// A reset may take a while on real hardware; the agent bounds it with
	// its device timeout.
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	req := &ferryv1.ReleaseDeviceRequest{Device: device, Reset_: *reset}
	var resp *ferryv1.ReleaseDeviceResponse
	if *dstAddr != "" {
		resp, err = ferryv1.NewDestAgentClient(conn).ReleaseDevice(cctx, req)
	} else {
		resp, err = ferryv1.NewSourceAgentClient(conn).ReleaseDevice(cctx, req)
	}
	if err != nil {
		return newCallError("release "+device+" at "+*addr, err, creds)
	}
	if *asJSON {
		b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(resp)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(stdout, "%s\n", b)
		return err
	}
	d := resp.GetDevice()
	how := "moved to RUNNING"
	switch {
	case *reset:
		how = "reset"
	case *dstAddr != "":
		how = "left"
	}
	fmt.Fprintf(stdout, "%s: %s, now %s", d.GetSpec(), how, stateName(d.GetState()))
	if d.GetError() != "" {
		fmt.Fprintf(stdout, " (%s)", d.GetError())
	}
	if resp.GetLetGo() {
		fmt.Fprint(stdout, "; the agent let go of it")
	}
	fmt.Fprintln(stdout)
	return nil
}
