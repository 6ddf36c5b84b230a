package shapedlink

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
)

// NamePrefix starts the name of every namespace this package makes:
// NamePrefix, the creating process's id, a counter and "s" or "d".
const NamePrefix = "ferrylink-"

// ErrUnsupported is wrapped by New's error when this machine cannot make a
// link: not root, no ip command, no network namespaces or veth, no tbf.
var ErrUnsupported = errors.New("shaped link unsupported here")

// devName is the veth end's name in both namespaces.
const devName = "link0"

// linkCounter numbers the links of this process.
var linkCounter atomic.Uint32

// Link is two namespaces joined by a shaped veth pair.
type Link struct {
	// Source and Dest are the two ends. The names say what a migration
	// test runs in each; the link itself is symmetric.
	Source, Dest *Namespace
	// Rate is the shaped rate in bytes per second, each direction; 0
	// when unshaped.
	Rate uint64

	closed atomic.Bool
}

// Namespace is one end of a link.
type Namespace struct {
	// Name is the network namespace's name (ip netns).
	Name string
	// Addr is its address on the link.
	Addr netip.Addr
}

// New makes a link shaped to rate bytes per second in each direction (0:
// unshaped). The caller must Close it; on error nothing is left behind.
func New(ctx context.Context, rate uint64) (*Link, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("%w: network namespaces need root", ErrUnsupported)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, fmt.Errorf("%w: no ip command: %v", ErrUnsupported, err)
	}
	if _, err := exec.LookPath("tc"); err != nil && rate > 0 {
		return nil, fmt.Errorf("%w: no tc command: %v", ErrUnsupported, err)
	}
	// A killed test binary's namespaces go first; a failure to sweep
	// does not stop this link.
	_ = Sweep(ctx)
	n := linkCounter.Add(1)
	base := NamePrefix + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatUint(uint64(n), 10)
	// One /30 per link, inside the namespaces only.
	sub := (n - 1) % (1 << 14)
	a := netip.AddrFrom4([4]byte{10, 213, byte(sub >> 6), byte(sub%64*4 + 1)})
	l := &Link{
		Source: &Namespace{Name: base + "s", Addr: a},
		Dest:   &Namespace{Name: base + "d", Addr: a.Next()},
		Rate:   rate,
	}
	if err := l.create(ctx); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// create makes the namespaces, the pair, the addresses and the qdiscs.
func (l *Link) create(ctx context.Context) error {
	for _, ns := range []*Namespace{l.Source, l.Dest} {
		if err := run(ctx, "ip", "netns", "add", ns.Name); err != nil {
			return fmt.Errorf("%w: %v", ErrUnsupported, err)
		}
	}
	// The pair is made straight into the namespaces: it never appears in
	// the host's namespace.
	if err := run(ctx, "ip", "link", "add", "name", devName, "netns", l.Source.Name, "type", "veth", "peer", "name", devName, "netns", l.Dest.Name); err != nil {
		return fmt.Errorf("%w: veth pair: %v", ErrUnsupported, err)
	}
	for _, ns := range []*Namespace{l.Source, l.Dest} {
		cmds := [][]string{
			{"ip", "-n", ns.Name, "link", "set", "lo", "up"},
			{"ip", "-n", ns.Name, "addr", "add", ns.Addr.String() + "/30", "dev", devName},
			{"ip", "-n", ns.Name, "link", "set", devName, "up"},
		}
		if l.Rate > 0 {
			cmds = append(cmds, append([]string{"tc", "-n", ns.Name, "qdisc", "add", "dev", devName, "root"}, tbfArgs(l.Rate)...))
		}
		for _, c := range cmds {
			if err := run(ctx, c[0], c[1:]...); err != nil {
				if c[0] == "tc" {
					return fmt.Errorf("%w: tbf: %v", ErrUnsupported, err)
				}
				return err
			}
		}
	}
	return nil
}

// tbfArgs are the qdisc arguments that shape to rate bytes per second:
// a bucket of 4 ms of the rate (at least 64 KiB, so a GSO packet fits
// without being cut), and a queue of up to 20 ms before packets drop,
// which TCP takes as a bottleneck as it would a switch's.
func tbfArgs(rate uint64) []string {
	burst := max(rate/250, 64<<10)
	return []string{"tbf", "rate", strconv.FormatUint(rate*8, 10) + "bit",
		"burst", strconv.FormatUint(burst, 10), "latency", "20ms"}
}

// Close removes the namespaces, and with them the pair and its qdiscs. It
// may be called more than once; it returns the first error.
func (l *Link) Close() error {
	if l.closed.Swap(true) {
		return nil
	}
	var first error
	for _, ns := range []*Namespace{l.Source, l.Dest} {
		if !exists(ns.Name) {
			continue
		}
		if err := run(context.Background(), "ip", "netns", "del", ns.Name); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// Sweep removes the namespaces with NamePrefix whose creating process no
// longer runs.
func Sweep(ctx context.Context) error {
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		return err
	}
	var first error
	for _, name := range stale(out, func(pid int) bool {
		_, err := os.Stat("/proc/" + strconv.Itoa(pid))
		return err == nil
	}) {
		if err := run(ctx, "ip", "netns", "del", name); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// stale picks from `ip netns list` output the names this package made
// whose process is not alive.
func stale(list []byte, alive func(pid int) bool) []string {
	var names []string
	for _, line := range strings.Split(string(list), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], NamePrefix) {
			continue
		}
		pid, _, ok := strings.Cut(strings.TrimPrefix(f[0], NamePrefix), "-")
		if !ok {
			continue
		}
		if n, err := strconv.Atoi(pid); err == nil && !alive(n) {
			names = append(names, f[0])
		}
	}
	return names
}

// exists reports whether the named namespace exists.
func exists(name string) bool {
	_, err := os.Stat("/run/netns/" + name)
	return err == nil
}

// Command returns a command that runs bin with args inside the namespace.
func (n *Namespace) Command(ctx context.Context, bin string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, bin}, args...)...)
}

// HostPort is the namespace's address with port, for a listen or dial
// address.
func (n *Namespace) HostPort(port int) string {
	return netip.AddrPortFrom(n.Addr, uint16(port)).String()
}

func run(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out.Bytes()))
	}
	return nil
}
