package shapedlink

import (
	"io"
	"net"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestStale(t *testing.T) {
	list := []byte(NamePrefix + "100-1s\n" + NamePrefix + "100-1d (id: 3)\n" + NamePrefix + "200-4s\nother-1s\n" + NamePrefix + "junk\n")
	got := stale(list, func(pid int) bool { return pid == 200 })
	want := []string{NamePrefix + "100-1s", NamePrefix + "100-1d"}
	if !slices.Equal(got, want) {
		t.Errorf("stale = %q, want %q", got, want)
	}
}

func TestTBFArgs(t *testing.T) {
	got := strings.Join(tbfArgs(500_000_000), " ")
	if want := "tbf rate 4000000000bit burst 2000000 latency 20ms"; got != want {
		t.Errorf("tbfArgs(4 Gbit/s) = %q, want %q", got, want)
	}
	if got := tbfArgs(1000)[4]; got != "65536" {
		t.Errorf("burst at 1 kB/s = %s, want the 64 KiB floor", got)
	}
}

// A link carries bytes between its namespaces, each end's sockets and
// processes live in their own namespace, the qdisc is tbf at the rate,
// and Close leaves nothing behind.
func TestLink(t *testing.T) {
	l := ForTest(t, 125_000_000) // 1 Gbit/s
	lis, err := l.Dest.Listen("tcp", l.Dest.HostPort(0))
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	msg := []byte("across the link")
	got := make(chan []byte, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		got <- b
	}()
	c, err := l.Source.DialContext(t.Context(), "tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if la := c.LocalAddr().(*net.TCPAddr); la.AddrPort().Addr() != l.Source.Addr {
		t.Errorf("the dialled connection is from %v, want the source end's %v", la, l.Source.Addr)
	}
	c.Write(msg)
	c.Close()
	if b := <-got; string(b) != string(msg) {
		t.Errorf("received %q, want %q", b, msg)
	}
	// The host's namespace cannot reach the link.
	if _, err := net.DialTimeout("tcp", lis.Addr().String(), 2*time.Second); err == nil {
		t.Error("the host's namespace reached the link's address")
	}
	out, err := l.Source.Command(t.Context(), "tc", "qdisc", "show", "dev", devName).CombinedOutput()
	if err != nil {
		t.Fatalf("tc in the namespace: %v: %s", err, out)
	}
	if !strings.Contains(string(out), "tbf") || !strings.Contains(string(out), "rate 1Gbit") {
		t.Errorf("qdisc = %s, want tbf at 1Gbit", out)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	for _, ns := range []*Namespace{l.Source, l.Dest} {
		if exists(ns.Name) {
			t.Errorf("namespace %s is left after Close", ns.Name)
		}
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), l.Source.Name) {
		t.Errorf("ip netns list still shows %s", l.Source.Name)
	}
}
