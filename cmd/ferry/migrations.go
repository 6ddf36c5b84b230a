package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/size"
)

// runMigrations is `ferry migrations list|get|watch|cancel`: the
// migrations an agent holds, over its control-plane API (SourceAgent's
// List/Get/Watch/CancelMigration, DestAgent's List/Get/Watch/
// CancelIncoming).
func runMigrations(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	const synopsis = "list|get|watch|cancel --agent ADDR [--role source|dest] [--id ID | ID] (--insecure | --tls-cert FILE --tls-key FILE --tls-ca FILE) [--json]"
	fs := newFlagSet("migrations", stderr, synopsis)
	addr := fs.String("agent", "", "the agent's address (host:port)")
	role := fs.String("role", "source", "which agent listens there: source or dest")
	id := fs.String("id", "", "the migration id (get, watch, cancel); may also be given as an argument")
	asJSON := fs.Bool("json", false, "print JSON (watch: one object a line)")
	var sec clientSecurityFlags
	sec.register(fs)
	rest, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(rest) == 0 {
		return usageError(errors.New("give a subcommand: list, get, watch or cancel"))
	}
	sub, rest := rest[0], rest[1:]
	if len(rest) > 0 && *id == "" {
		*id, rest = rest[0], rest[1:]
	}
	switch {
	case len(rest) > 0:
		return usageError(fmt.Errorf("unexpected argument %q", rest[0]))
	case *addr == "":
		return usageError(errors.New("--agent is required"))
	case *role != "source" && *role != "dest":
		return usageError(errors.New("--role must be source or dest"))
	}
	switch sub {
	case "list":
		if *id != "" {
			return usageError(errors.New("list takes no migration id"))
		}
	case "get", "watch", "cancel":
		if *id == "" {
			return usageError(fmt.Errorf("%s needs a migration id (--id ID)", sub))
		}
	default:
		return usageError(fmt.Errorf("unknown subcommand %q: want list, get, watch or cancel", sub))
	}
	conn, creds, err := sec.dial(*addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	c := migrationsClient{agent: newAgentMigrations(conn, *role), addr: *addr, creds: creds, out: stdout, stderr: stderr, json: *asJSON}
	switch sub {
	case "list":
		return c.list(ctx)
	case "get":
		return c.get(ctx, *id)
	case "watch":
		return c.watch(ctx, *id)
	}
	return c.cancel(ctx, *id)
}

// agentMigrations is the part of either agent's API the command uses.
type agentMigrations interface {
	list(context.Context) ([]*ferryv1.Migration, error)
	get(context.Context, string) (*ferryv1.Migration, error)
	watch(context.Context, string, func(*ferryv1.Migration) error) error
	cancel(context.Context, string) (*ferryv1.Migration, error)
}

func newAgentMigrations(conn grpc.ClientConnInterface, role string) agentMigrations {
	if role == "dest" {
		return destMigrations{ferryv1.NewDestAgentClient(conn)}
	}
	return sourceMigrations{ferryv1.NewSourceAgentClient(conn)}
}

type sourceMigrations struct{ c ferryv1.SourceAgentClient }

func (s sourceMigrations) list(ctx context.Context) ([]*ferryv1.Migration, error) {
	r, err := s.c.ListMigrations(ctx, &ferryv1.ListMigrationsRequest{})
	return r.GetMigrations(), err
}

func (s sourceMigrations) get(ctx context.Context, id string) (*ferryv1.Migration, error) {
	r, err := s.c.GetMigration(ctx, &ferryv1.GetMigrationRequest{MigrationId: id})
	return r.GetMigration(), err
}

func (s sourceMigrations) watch(ctx context.Context, id string, each func(*ferryv1.Migration) error) error {
	st, err := s.c.WatchMigration(ctx, &ferryv1.WatchMigrationRequest{MigrationId: id})
	if err != nil {
		return err
	}
	return recvAll(st.Recv, (*ferryv1.WatchMigrationResponse).GetMigration, each)
}

func (s sourceMigrations) cancel(ctx context.Context, id string) (*ferryv1.Migration, error) {
	r, err := s.c.CancelMigration(ctx, &ferryv1.CancelMigrationRequest{MigrationId: id})
	return r.GetMigration(), err
}

type destMigrations struct{ c ferryv1.DestAgentClient }

func (d destMigrations) list(ctx context.Context) ([]*ferryv1.Migration, error) {
	r, err := d.c.ListIncoming(ctx, &ferryv1.ListIncomingRequest{})
	return r.GetMigrations(), err
}

func (d destMigrations) get(ctx context.Context, id string) (*ferryv1.Migration, error) {
	r, err := d.c.GetIncoming(ctx, &ferryv1.GetIncomingRequest{MigrationId: id})
	return r.GetMigration(), err
}

func (d destMigrations) watch(ctx context.Context, id string, each func(*ferryv1.Migration) error) error {
	st, err := d.c.WatchIncoming(ctx, &ferryv1.WatchIncomingRequest{MigrationId: id})
	if err != nil {
		return err
	}
	return recvAll(st.Recv, (*ferryv1.WatchIncomingResponse).GetMigration, each)
}

func (d destMigrations) cancel(ctx context.Context, id string) (*ferryv1.Migration, error) {
	r, err := d.c.CancelIncoming(ctx, &ferryv1.CancelIncomingRequest{MigrationId: id})
	return r.GetMigration(), err
}

// recvAll hands every migration a watch stream sends to each, until the
// stream ends.
func recvAll[R any](recv func() (R, error), get func(R) *ferryv1.Migration, each func(*ferryv1.Migration) error) error {
	for {
		r, err := recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := each(get(r)); err != nil {
			return err
		}
	}
}

// migrationsClient runs one subcommand against one agent.
type migrationsClient struct {
	agent agentMigrations
	addr  string
	creds credentials.TransportCredentials
	out   io.Writer
	// stderr hears what is not the result (a stopped watch).
	stderr io.Writer
	json   bool
}

const callTimeout = 30 * time.Second

func (c migrationsClient) list(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	ms, err := c.agent.list(cctx)
	if err != nil {
		return newCallError("list the migrations of "+c.addr, err, c.creds)
	}
	if c.json {
		return c.printJSON(&ferryv1.ListMigrationsResponse{Migrations: ms})
	}
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tPHASE\tDEVICES\tBYTES\tCREATED\tERROR")
	for _, m := range ms {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", m.GetId(), phaseName(m.GetPhase()), len(m.GetDevices()),
			bytesText(m), m.GetCreateTime().AsTime().Local().Format(time.DateTime), errorText(m.GetError()))
	}
	return tw.Flush()
}

func (c migrationsClient) get(ctx context.Context, id string) error {
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	m, err := c.agent.get(cctx, id)
	if err != nil {
		return newCallError("get migration "+id+" at "+c.addr, err, c.creds)
	}
	if c.json {
		return c.printJSON(m)
	}
	c.printMigration(m)
	return nil
}

// watch prints the migration, then every change, until its final phase
// (or until interrupted: the migration goes on).
func (c migrationsClient) watch(ctx context.Context, id string) error {
	var last *ferryv1.Migration
	err := c.agent.watch(ctx, id, func(m *ferryv1.Migration) error {
		last = m
		if c.json {
			b, err := protojson.Marshal(m)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(c.out, "%s\n", b)
			return err
		}
		_, err := fmt.Fprintf(c.out, "%s  %s  %s  %s\n", time.Now().Format(time.TimeOnly), m.GetId(), phaseText(m), bytesText(m))
		return err
	})
	if err != nil && ctx.Err() != nil {
		// Interrupted: the watch stops, the migration does not.
		fmt.Fprintf(c.stderr, "ferry migrations: watch of %s stopped; the migration goes on ('ferry migrations cancel' rolls it back)\n", id)
		return nil
	}
	if err != nil {
		return newCallError("watch migration "+id+" at "+c.addr, err, c.creds)
	}
	if last != nil && !c.json {
		c.printMigration(last)
	}
	return nil
}

func (c migrationsClient) cancel(ctx context.Context, id string) error {
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	m, err := c.agent.cancel(cctx, id)
	if err != nil {
		return newCallError("cancel migration "+id+" at "+c.addr, err, c.creds)
	}
	if c.json {
		return c.printJSON(m)
	}
	_, err = fmt.Fprintf(c.out, "migration %s: cancel asked; now %s (the agent rolls it back: follow it with 'ferry migrations watch')\n", id, phaseName(m.GetPhase()))
	return err
}

func (c migrationsClient) printJSON(m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(c.out, "%s\n", b)
	return err
}

// printMigration prints one migration as a block of lines.
func (c migrationsClient) printMigration(m *ferryv1.Migration) {
	w := c.out
	fmt.Fprintf(w, "migration %s: %s\n", m.GetId(), phaseText(m))
	if o := m.GetOwner(); o != ferryv1.DeviceOwner_DEVICE_OWNER_UNSPECIFIED {
		fmt.Fprintf(w, "  owner        %s\n", ownerName(o))
	}
	if e := m.GetError(); e != nil {
		fmt.Fprintf(w, "  error        %s\n", errorText(e))
	}
	fmt.Fprintf(w, "  bytes        %s in %d device(s)\n", bytesText(m), len(m.GetDevices()))
	fmt.Fprintf(w, "  channels     %d (%d connected), chunks of %s\n", m.GetChannels(), m.GetConnectedChannels(), size.Format(uint64(m.GetChunkSize())))
	if d := m.GetDowntime(); d != nil {
		fmt.Fprintf(w, "  downtime     %s\n", d.AsDuration().Round(time.Millisecond))
	}
	for _, d := range m.GetDevices() {
		line := fmt.Sprintf("  %s -> %s: %s of %s, %s", d.GetDevice(), d.GetPeerDevice(), size.Format(d.GetBytes()), totalText(d), stateName(d.GetState()))
		if d.GetVerified() {
			line += ", verified"
		}
		if d.GetError() != "" {
			line += ": " + d.GetError()
		}
		fmt.Fprintln(w, line)
	}
}

// bytesText is the migration's bytes, of its total when every device's
// total is known.
func bytesText(m *ferryv1.Migration) string {
	var total uint64
	for _, d := range m.GetDevices() {
		if d.GetTotalBytes() == 0 {
			return size.Format(m.GetBytes())
		}
		total += d.GetTotalBytes()
	}
	if total == 0 {
		return size.Format(m.GetBytes())
	}
	return size.Format(m.GetBytes()) + "/" + size.Format(total)
}

// errorText is a migration error as CODE REASON: message, "-" for none.
func errorText(e *ferryv1.MigrationError) string {
	if e == nil {
		return "-"
	}
	parts := []string{codeName(codes.Code(e.GetCode()))}
	if e.GetReason() != "" {
		parts = append(parts, e.GetReason())
	}
	return strings.Join(parts, " ") + ": " + e.GetMessage()
}
