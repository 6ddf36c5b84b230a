package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/size"
)

func runDevices(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("devices", stderr, "--agent ADDR [--role source|dest] (--insecure | --tls-cert FILE --tls-key FILE --tls-ca FILE) [--json]")
	addr := fs.String("agent", "", "the agent's address (host:port)")
	role := fs.String("role", "source", "which agent listens there: source or dest")
	var sec clientSecurityFlags
	sec.register(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *addr == "" {
		return usageError(errors.New("--agent is required"))
	}
	if *role != "source" && *role != "dest" {
		return usageError(errors.New("--role must be source or dest"))
	}
	conn, creds, err := sec.dial(*addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var resp *ferryv1.ListDevicesResponse
	switch *role {
	case "source":
		resp, err = ferryv1.NewSourceAgentClient(conn).ListDevices(cctx, &ferryv1.ListDevicesRequest{})
	case "dest":
		resp, err = ferryv1.NewDestAgentClient(conn).ListDevices(cctx, &ferryv1.ListDevicesRequest{})
	}
	if err != nil {
		return newCallError("list the devices of "+*addr, err, creds)
	}
	if *asJSON {
		b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(resp)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(stdout, "%s\n", b)
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SPEC\tMIGRATION FLAGS\tSTATE\tSTATE SIZE\tOWNER")
	for _, d := range resp.GetDevices() {
		sz := "-"
		if d.GetEstimatedStateBytes() > 0 {
			sz = size.Format(d.GetEstimatedStateBytes())
		}
		owner := d.GetOwner()
		if owner == "" {
			owner = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", d.GetSpec(), d.GetMigrationFlagsText(), stateName(d.GetState()), sz, owner)
	}
	return tw.Flush()
}
