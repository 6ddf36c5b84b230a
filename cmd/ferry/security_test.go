package main

import (
	"flag"
	"io"
	"slices"
	"strings"
	"testing"

	"github.com/vfio-ferry/ferry/services/peerauth/peerauthtest"
)

func parseSecurity(t *testing.T, servesTransfer bool, args ...string) (*securityFlags, error) {
	t.Helper()
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var f securityFlags
	f.register(fs, servesTransfer)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	return &f, f.check()
}

func TestSecurityFlags(t *testing.T) {
	ca := peerauthtest.NewCA(t, "ferry test CA")
	agent := ca.Issue(t, "localhost", "spiffe://ferry.test/agent")
	tlsArgs := []string{"--tls-cert", agent.Cert, "--tls-key", agent.Key, "--tls-ca", agent.CA}
	with := func(extra ...string) []string { return append(slices.Clone(tlsArgs), extra...) }
	cases := []struct {
		name      string
		transfer  bool
		args      []string
		wantError string // "" accepts
	}{
		{"nothing", true, nil, "no transport security"},
		{"insecure", true, []string{"--insecure"}, ""},
		{"insecure with devices", false, []string{"--insecure", "--devices", "pci:0000:3b:*"}, ""},
		{"insecure and TLS", true, with("--insecure"), "exclude each other"},
		{"insecure and an allowlist", true, []string{"--insecure", "--allow-client", "x"}, "need TLS"},
		{"half of TLS", true, []string{"--tls-cert", agent.Cert, "--allow-client", "x", "--allow-peer", "y"}, "all of --tls-cert, --tls-key and --tls-ca"},
		{"TLS without --allow-client", false, with(), "--allow-client is required"},
		{"dest without --allow-peer", true, with("--allow-client", "spiffe://ferry.test/cp"), "--allow-peer is required"},
		{"source without --allow-peer", false, with("--allow-client", "spiffe://ferry.test/cp"), ""},
		{"dest with both", true, with("--allow-client", "spiffe://ferry.test/cp", "--allow-peer", "spiffe://ferry.test/agent"), ""},
		{"a glob in an identity", true, with("--allow-client", "spiffe://ferry.test/*", "--allow-peer", "*"), "matched exactly"},
		{"a sim pattern", false, []string{"--insecure", "--devices", "sim:*"}, "simulated devices"},
		{"a bad glob", false, []string{"--insecure", "--devices", "pci:[0"}, "--devices"},
	}
	for _, tc := range cases {
		f, err := parseSecurity(t, tc.transfer, tc.args...)
		switch {
		case tc.wantError == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.wantError != "" && (err == nil || !strings.Contains(err.Error(), tc.wantError)):
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.wantError)
		}
		if _, _, _, terr := f.transport(nil); (terr == nil) != (err == nil) {
			t.Errorf("%s: transport %v, check %v", tc.name, terr, err)
		}
	}
}

func TestSecurityFlagLists(t *testing.T) {
	f, err := parseSecurity(t, true, "--insecure", "--devices", "pci:0000:3b:*, mdev:*", "--devices", "pci:0000:5e:00.1,")
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"pci:0000:3b:*", "mdev:*", "pci:0000:5e:00.1"}; !slices.Equal(f.devices, want) {
		t.Fatalf("devices %q, want %q", f.devices, want)
	}
	if opts := f.registry(true); !opts.AllowSim || !slices.Equal(opts.Devices, f.devices) {
		t.Fatalf("registry options %+v", opts)
	}
	if f.access() != nil {
		t.Fatal("plaintext agents get authorization rules")
	}
	ca := peerauthtest.NewCA(t, "ferry test CA")
	agent := ca.Issue(t, "localhost")
	f, err = parseSecurity(t, true, "--tls-cert", agent.Cert, "--tls-key", agent.Key, "--tls-ca", agent.CA,
		"--allow-client", "spiffe://a/cp,ops.example", "--allow-peer", "spiffe://a/agent")
	if err != nil {
		t.Fatal(err)
	}
	rules := f.access()
	if len(rules) != 2 || !slices.Equal(rules[0].Allow, []string{"spiffe://a/cp", "ops.example"}) ||
		!slices.Contains(rules[0].Services, "ferry.v1.SourceAgent") || !slices.Contains(rules[0].Services, "ferry.v1.DestAgent") ||
		!slices.Equal(rules[1].Services, []string{"ferry.v1.Transfer"}) || !slices.Equal(rules[1].Allow, []string{"spiffe://a/agent"}) {
		t.Fatalf("rules %+v", rules)
	}
	if _, _, _, err := f.transport(nil); err != nil {
		t.Fatal(err)
	}
}

func TestClientSecurityFlags(t *testing.T) {
	parse := func(args ...string) error {
		fs := flag.NewFlagSet("test", flag.ContinueOnError)
		var f clientSecurityFlags
		f.register(fs)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		_, err := f.creds()
		return err
	}
	ca := peerauthtest.NewCA(t, "ferry test CA")
	c := ca.Issue(t, "spiffe://ferry.test/cp")
	if err := parse(); err == nil || !strings.Contains(err.Error(), "--insecure") {
		t.Errorf("no flags: %v", err)
	}
	if err := parse("--insecure", "--tls-ca", c.CA); err == nil {
		t.Error("--insecure with --tls-ca accepted")
	}
	if err := parse("--insecure"); err != nil {
		t.Error(err)
	}
	if err := parse("--tls-cert", c.Cert, "--tls-key", c.Key, "--tls-ca", c.CA, "--tls-server-name", "node-1"); err != nil {
		t.Error(err)
	}
}
