package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// TestMigrationsCommands drives `ferry migrations` against two loopback
// agents: a finished migration is listed and shown on both, a watch of
// it prints its final state, and a slow one is cancelled and rolls back.
func TestMigrationsCommands(t *testing.T) {
	a := simAgents(t)
	dev := "sim:size=8MiB,seed=4"
	if code, out, errOut := runCLI(t, "migrate", "--insecure", "--source", a.SourceAddr, "--dest", a.DestAddr, "--id", "done-1",
		"--src-device", dev, "--dest-device", dev); code != 0 {
		t.Fatalf("migrate: exit %d\n%s\n%s", code, out, errOut)
	}

	for _, role := range []struct{ name, addr string }{{"source", a.SourceAddr}, {"dest", a.DestAddr}} {
		code, out, errOut := runCLI(t, "migrations", "list", "--insecure", "--agent", role.addr, "--role", role.name)
		if code != 0 || !strings.Contains(out, "done-1") || !strings.Contains(out, "SUCCEEDED") {
			t.Errorf("%s list: exit %d\n%s%s", role.name, code, out, errOut)
		}
		code, out, errOut = runCLI(t, "migrations", "get", "done-1", "--insecure", "--agent", role.addr, "--role", role.name, "--json")
		var m struct {
			ID    string `json:"id"`
			Phase string `json:"phase"`
		}
		if code != 0 || json.Unmarshal([]byte(out), &m) != nil || m.ID != "done-1" || m.Phase != "MIGRATION_PHASE_SUCCEEDED" {
			t.Errorf("%s get --json: exit %d, %+v\n%s%s", role.name, code, m, out, errOut)
		}
		code, out, errOut = runCLI(t, "migrations", "watch", "--id", "done-1", "--insecure", "--agent", role.addr, "--role", role.name)
		if code != 0 || !strings.Contains(out, "migration done-1: SUCCEEDED") || !strings.Contains(out, "verified") {
			t.Errorf("%s watch: exit %d\n%s%s", role.name, code, out, errOut)
		}
	}

	// A migration slow enough to be cancelled (64 MiB read at 8 MB/s):
	// `ferry migrations cancel` at its first progress report.
	p := plan{id: "slow-1", sourceAddr: a.SourceAddr, destAddr: a.DestAddr, transfer: a.DestAddr, channels: 2,
		chunkSize: 1 << 20, creds: insecure.NewCredentials(),
		pairs: []*ferryv1.DevicePair{{SourceDevice: "sim:size=64MiB,seed=5,rate=8MB/s", DestDevice: "sim:size=64MiB,seed=5"}}}
	asked := false
	r, err := migrate(t.Context(), p, func(*ferryv1.Migration) {
		if asked {
			return
		}
		asked = true
		// A watch interrupted (Ctrl-C) after its first line stops, and
		// says the migration goes on.
		wctx, stop := context.WithCancel(t.Context())
		var werr bytes.Buffer
		code := run(wctx, []string{"migrations", "watch", "slow-1", "--insecure", "--agent", a.SourceAddr}, cancelOnWrite{stop}, &werr)
		if code != 0 || !strings.Contains(werr.String(), "watch of slow-1 stopped; the migration goes on") {
			t.Errorf("interrupted watch: exit %d, stderr %q", code, werr.String())
		}
		if code, out, errOut := runCLI(t, "migrations", "cancel", "slow-1", "--insecure", "--agent", a.SourceAddr); code != 0 || !strings.Contains(out, "cancel asked") {
			t.Errorf("cancel: exit %d\n%s%s", code, out, errOut)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if r.Phase != "CANCELLED" {
		t.Errorf("the cancelled migration ended %s", r.Phase)
	}
	code, out, errOut := runCLI(t, "migrations", "get", "slow-1", "--insecure", "--agent", a.SourceAddr)
	if code != 0 || !strings.Contains(out, "CANCELLED") || !strings.Contains(out, "MIGRATION_CANCELLED") {
		t.Errorf("get after cancel: exit %d\n%s%s", code, out, errOut)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"migrations", "--insecure", "--agent", "x"}, "give a subcommand"},
		{[]string{"migrations", "get", "--insecure", "--agent", "x"}, "get needs a migration id"},
		{[]string{"migrations", "list", "--insecure"}, "--agent is required"},
		{[]string{"migrations", "stop", "--insecure", "--agent", "x", "--id", "y"}, `unknown subcommand "stop"`},
	} {
		if code, _, errOut := runCLI(t, tc.args...); code != 2 || !strings.Contains(errOut, tc.want) {
			t.Errorf("ferry %q: exit %d, stderr %q", tc.args, code, errOut)
		}
	}
}

// cancelOnWrite is a writer that cancels a context at its first write.
type cancelOnWrite struct{ cancel context.CancelFunc }

func (w cancelOnWrite) Write(p []byte) (int, error) {
	w.cancel()
	return len(p), nil
}

func TestVersion(t *testing.T) {
	code, out, _ := runCLI(t, "version")
	if code != 0 || !strings.HasPrefix(out, "ferry ") || !strings.Contains(out, "go1.") {
		t.Errorf("version: exit %d, %q", code, out)
	}
	code, out, _ = runCLI(t, "version", "--json")
	var v struct{ Version, Go string }
	if code != 0 || json.Unmarshal([]byte(out), &v) != nil || v.Version == "" || !strings.HasPrefix(v.Go, "go1.") {
		t.Errorf("version --json: exit %d, %q", code, out)
	}
}
