package soak

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/ephemeralca"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/test/tcpproxy"
)

// budgetSeedBase is the first seed of the budget fault's devices, far
// above any pool's seeds.
const budgetSeedBase = 1 << 40

// The agents' limits and deadlines in the soak: short deadlines so that
// faults resolve in seconds.
const (
	destWindowBytes  = 16 << 20
	destWindowChunks = 64
	deviceTimeout    = time.Second
)

var (
	sourceFlags = []string{"--reconnect-timeout", "2s", "--progress-timeout", "2s", "--drain-timeout", "1s"}
	destFlags   = []string{"--source-timeout", "2s", "--drain-timeout", "1s",
		"--max-buffer-bytes", fmt.Sprint(destWindowBytes), "--max-buffers", fmt.Sprint(destWindowChunks)}
)

// Config is one soak run.
type Config struct {
	// Exe is the ferry binary the agents run as (`ferry dest`, `ferry
	// source`); `ferry soak` passes itself.
	Exe string
	// Seed draws every parameter and fault; the same seed draws the same
	// migrations.
	Seed uint64
	// Migrations is how many migrations to run (warm-ups not counted);
	// 0 means no limit (then Duration must be set).
	Migrations int
	// Duration stops the soak starting rounds after this long; 0 means no
	// limit.
	Duration time.Duration
	// Concurrency is the most migrations run at once (each round draws 1
	// to Concurrency); 0 means 4.
	Concurrency int
	// FaultProbability is the chance, 0 to 1, that a migration has
	// faults (one, or two a third of the time).
	FaultProbability float64
	// LogDir receives the agents' logs; "" is a directory of its own,
	// removed after a soak that found nothing.
	LogDir string
	// Progress, when set, hears a line per round.
	Progress io.Writer
}

func (c *Config) setDefaults() error {
	if c.Exe == "" {
		return errors.New("soak: no ferry binary")
	}
	if c.Migrations < 0 || c.Duration < 0 {
		return errors.New("soak: --migrations and --duration must not be negative")
	}
	if c.Migrations == 0 && c.Duration == 0 {
		return errors.New("soak: set --migrations or --duration")
	}
	if c.Concurrency == 0 {
		c.Concurrency = 4
	}
	if c.Concurrency < 1 || c.Concurrency > 16 {
		return errors.New("soak: --concurrency must be 1 to 16")
	}
	if !(c.FaultProbability >= 0 && c.FaultProbability <= 1) {
		return errors.New("soak: --fault-probability must be 0 to 1")
	}
	return nil
}

// destBudget is the destinations' --memory-budget: the windows of the
// most migrations of the most devices at once, and a rival's.
func (c *Config) destBudget() uint64 {
	return uint64(c.Concurrency*4+2) * dest.WindowCost(destWindowChunks, destWindowBytes)
}

// bounds are how far above its baseline an idle agent may be: a few
// goroutines and fds for connections still closing, and for RSS the
// windows of the migrations a round runs.
func (c *Config) bounds() bounds {
	return bounds{goroutines: 16, fds: 8, rss: uint64(c.Concurrency*4)*destWindowBytes + 96<<20}
}

// Report is what a soak did.
type Report struct {
	Seed       uint64         `json:"seed"`
	Migrations int            `json:"migrations"`
	Rounds     int            `json:"rounds"`
	Seconds    float64        `json:"seconds"`
	Outcomes   map[string]int `json:"outcomes"` // by final phase (or REFUSED, SOURCE_LOST)
	Reasons    map[string]int `json:"reasons"`  // failures by ErrorInfo reason
	// Faults are the faults drawn, and Triggered those that happened,
	// by class.
	Faults    map[string]int `json:"faults"`
	Triggered map[string]int `json:"triggered"`
	// Checks are the invariant checks run, by invariant.
	Checks      map[string]int `json:"checks"`
	ChecksTotal int            `json:"checks_total"`
	Restarts    map[string]int `json:"restarts"`
	// ControlPlane counts what the soak's control plane saw the agents
	// answer: budget prepares refused, rivals refused or admitted (the
	// migration had let the device go), destinations in doubt resolved.
	ControlPlane map[string]int `json:"control_plane"`
	// Peak usage of each agent seen at the checks, and its baseline.
	Usage     map[string]usage `json:"peak_usage"`
	Baselines map[string]usage `json:"baselines"`
	// Violation is the first invariant that failed; nil when none did.
	Violation *ViolationReport `json:"violation,omitempty"`
	LogDir    string           `json:"log_dir,omitempty"`
}

// ViolationReport is the first violation, with what replays it.
type ViolationReport struct {
	Invariant string            `json:"invariant"`
	Detail    string            `json:"detail"`
	Migration *migrationPlan    `json:"migration,omitempty"`
	Outcome   *outcome          `json:"outcome,omitempty"`
	Notes     []string          `json:"notes,omitempty"`
	Logs      map[string]string `json:"logs"` // the tail of each agent's log
}

// ErrViolation is wrapped by Run's error when an invariant failed.
var ErrViolation = errors.New("invariant violated")

// soak is one run.
type soak struct {
	cfg     Config
	rng     *rand.Rand
	planner *planner
	certs   *soakCerts
	sources map[bool]*agent // by TLS
	dests   map[lane]*agent
	conns   map[*agent]*grpc.ClientConn
	logDir  string
	checks  checks
	stats   stats

	mu        sync.Mutex
	base      map[*agent]usage
	peak      map[*agent]usage
	restartMu map[*agent]*sync.Mutex
}

// stats are counters the faults keep.
type stats struct {
	budgetRefused, rivalRefused, rivalWon, inDoubt atomic.Int64
}

// Run runs the soak and reports it; err wraps ErrViolation when an
// invariant failed (the report says which), or says why the soak could
// not run.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	s := &soak{
		cfg: cfg, rng: rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x5eed)),
		sources: map[bool]*agent{}, dests: map[lane]*agent{}, conns: map[*agent]*grpc.ClientConn{},
		base: map[*agent]usage{}, peak: map[*agent]usage{}, restartMu: map[*agent]*sync.Mutex{},
	}
	s.planner = &planner{rng: s.rng, cfg: &s.cfg, slots: newSlots(s.rng, cfg.Concurrency*4+4, 1000)}
	keepLogs := cfg.LogDir != ""
	s.logDir = cfg.LogDir
	if s.logDir == "" {
		d, err := os.MkdirTemp("", "ferry-soak-")
		if err != nil {
			return nil, err
		}
		s.logDir = d
	} else if err := os.MkdirAll(s.logDir, 0o755); err != nil {
		return nil, err
	}
	rep, err := s.run(ctx)
	s.stop()
	if err != nil || rep.Violation != nil || keepLogs {
		rep.LogDir = s.logDir
	} else {
		os.RemoveAll(s.logDir)
	}
	return rep, err
}

func (s *soak) run(ctx context.Context) (*Report, error) {
	began := time.Now()
	rep := &Report{Seed: s.cfg.Seed, Outcomes: map[string]int{}, Reasons: map[string]int{}, Faults: map[string]int{},
		Triggered: map[string]int{}, Restarts: map[string]int{}, Usage: map[string]usage{}, Baselines: map[string]usage{}}
	finish := func(v *ViolationReport) (*Report, error) {
		rep.Seconds = time.Since(began).Seconds()
		rep.Checks = s.checks.snapshot()
		rep.ControlPlane = map[string]int{"budget_refused": int(s.stats.budgetRefused.Load()), "rival_refused": int(s.stats.rivalRefused.Load()),
			"rival_admitted": int(s.stats.rivalWon.Load()), "in_doubt_resolved": int(s.stats.inDoubt.Load())}
		for _, n := range rep.Checks {
			rep.ChecksTotal += n
		}
		for _, a := range s.agents() {
			rep.Restarts[a.name] = a.epoch()
			s.mu.Lock()
			rep.Usage[a.name], rep.Baselines[a.name] = s.peak[a], s.base[a]
			s.mu.Unlock()
		}
		if v != nil {
			rep.Violation = v
			return rep, fmt.Errorf("%w: %s: %s (seed %d)", ErrViolation, v.Invariant, v.Detail, s.cfg.Seed)
		}
		return rep, nil
	}
	if err := s.startAgents(ctx); err != nil {
		return rep, err
	}
	if v, err := s.warmUp(ctx, s.agents()); err != nil || v != nil {
		if err != nil {
			return rep, err
		}
		return finish(v)
	}
	for r := 0; ; r++ {
		if s.cfg.Migrations > 0 && rep.Migrations >= s.cfg.Migrations {
			break
		}
		if s.cfg.Duration > 0 && time.Since(began) >= s.cfg.Duration {
			break
		}
		if ctx.Err() != nil {
			return finish(nil)
		}
		k := 1 + s.rng.IntN(s.cfg.Concurrency)
		if s.cfg.Migrations > 0 {
			k = min(k, s.cfg.Migrations-rep.Migrations)
		}
		v, err := s.round(ctx, r, k, rep)
		rep.Rounds++
		if err != nil {
			return rep, err
		}
		if v != nil {
			return finish(v)
		}
	}
	return finish(nil)
}

// round runs k migrations at once, checks each as it ends and the agents
// after all have, and restarts the agents left holding a hung device.
func (s *soak) round(ctx context.Context, r, k int, rep *Report) (*ViolationReport, error) {
	free := make(map[int]bool, len(s.planner.slots))
	for i := range s.planner.slots {
		free[i] = true
	}
	var runs []*migrationRun
	for i := range k {
		p := s.planner.draw(r, free)
		if p == nil {
			break
		}
		canonical(p)
		m, err := s.newRun(p, i)
		if err != nil {
			return nil, err
		}
		runs = append(runs, m)
	}
	before := map[*agent]int{}
	for _, a := range s.agents() {
		before[a] = a.epoch()
	}
	var (
		mu    sync.Mutex
		first *ViolationReport
	)
	fail := func(m *migrationRun, o *outcome, err error) {
		var v *violation
		if !errors.As(err, &v) {
			v = violate("soak", "%v", err)
		}
		mu.Lock()
		defer mu.Unlock()
		if first == nil {
			first = s.violationReport(v, m, o)
		}
	}
	var g errgroup.Group
	for _, m := range runs {
		g.Go(func() error {
			o, err := m.run(ctx)
			m.closeProxies()
			m.proxyTriggered()
			if err != nil {
				fail(m, o, err)
				return nil
			}
			if err := s.checkMigration(ctx, m, o); err != nil {
				fail(m, o, err)
				return nil
			}
			if err := s.release(ctx, m, o); err != nil {
				fail(m, o, err)
				return nil
			}
			mu.Lock()
			rep.Migrations++
			rep.Outcomes[o.Phase]++
			if o.Reason != "" {
				rep.Reasons[o.Reason]++
			}
			for _, f := range m.p.Faults {
				rep.Faults[string(f.Class)]++
				if f.Triggered {
					rep.Triggered[string(f.Class)]++
				}
			}
			mu.Unlock()
			return nil
		})
	}
	g.Wait()
	if ctx.Err() != nil {
		// Interrupted: what the round's migrations saw of it is no
		// violation. Run reports what ran.
		return nil, nil
	}
	if first != nil {
		return first, nil
	}
	// Between rounds: agents holding a hung device are restarted (its
	// operation never returns); then every agent is checked.
	var ids []string
	for _, m := range runs {
		m.mu.Lock()
		ids = append(append(ids, m.p.ID), m.extraIDs...)
		m.mu.Unlock()
	}
	var restarted []*agent
	for _, a := range s.agents() {
		devs, err := s.listDevices(ctx, a)
		if err != nil {
			return nil, err
		}
		if stuck := stuckDevices(devs); len(stuck) > 0 {
			if err := s.restart(ctx, a); err != nil {
				return nil, err
			}
		}
		if a.epoch() != before[a] {
			restarted = append(restarted, a)
		}
	}
	if len(restarted) > 0 {
		if v, err := s.warmUp(ctx, restarted); err != nil || v != nil {
			return v, err
		}
	}
	for _, a := range s.agents() {
		if err := s.checkAgent(ctx, a, ids); err != nil {
			var v *violation
			if !errors.As(err, &v) {
				return nil, err
			}
			return s.violationReport(v, nil, nil), nil
		}
	}
	if s.cfg.Progress != nil {
		var outs []string
		for _, m := range runs {
			outs = append(outs, m.p.ID)
		}
		fmt.Fprintf(s.cfg.Progress, "round %d: %d migration(s) (%s); %d so far, %d checks\n", r, len(runs), strings.Join(outs, " "), rep.Migrations, s.checkCount())
	}
	return nil, nil
}

func (s *soak) checkCount() int {
	n := 0
	for _, c := range s.checks.snapshot() {
		n += c
	}
	return n
}

// canonical rewrites the plan's specs in canonical form, as the agents
// list them.
func canonical(p *migrationPlan) {
	for i := range p.Devices {
		d := &p.Devices[i]
		d.Src, d.Dst = canonicalSpec(d.Src), canonicalSpec(d.Dst)
	}
}

// canonicalSpec is spec in canonical form (spec itself if it does not
// parse: the agents then refuse it, which the checks report).
func canonicalSpec(spec string) string {
	if sp, err := vfio.ParseSpec(spec); err == nil {
		return sp.String()
	}
	return spec
}

// proxyHost is the k-th loopback address migrations reach their
// destinations at: 127.0.0.10 and up. The agents' certificate names
// proxyHosts of them.
func proxyHost(k int) string { return fmt.Sprintf("127.0.0.%d", 10+k) }

// proxyHosts is how many proxy addresses there are: four for each of the
// most migrations a round runs.
const proxyHosts = 64

// newRun prepares the i-th migration of a round: its proxies and its own
// random source. The proxies share an address of their own: the data
// proxy must listen at the destination's data port, which something else
// may hold on one address (another soak's proxy, say), so the next of
// the migration's four addresses is tried.
func (s *soak) newRun(p *migrationPlan, i int) (*migrationRun, error) {
	src, dst := s.sources[p.Lane.TLS], s.dests[p.Lane]
	m := &migrationRun{s: s, p: p, src: src, dst: dst, rng: rand.New(rand.NewPCG(s.rng.Uint64(), 0))}
	var errs []error
	for k := i; k < proxyHosts; k += 16 {
		host := proxyHost(k)
		if p.Lane.Direct {
			_, port, err := net.SplitHostPort(dst.dataAddress())
			if err == nil {
				m.data, err = tcpproxy.NewOn(net.JoinHostPort(host, port), dst.dataAddress())
			}
			if err != nil {
				errs = append(errs, err)
				continue
			}
		}
		proxy, err := tcpproxy.NewOn(host+":0", dst.Addr())
		if err != nil {
			if m.data != nil {
				m.data.Close()
				m.data = nil
			}
			errs = append(errs, err)
			continue
		}
		m.proxy = proxy
		return m, nil
	}
	return nil, fmt.Errorf("proxies for %s: %w", dst.name, errors.Join(errs...))
}

// release gives the source devices of a migration that succeeded back
// to their host, as a control plane does once the VM has moved, so the
// pool's devices can migrate again.
func (s *soak) release(ctx context.Context, m *migrationRun, o *outcome) error {
	if o.Phase != "SUCCEEDED" {
		return nil
	}
	for _, d := range m.p.Devices {
		cctx, cancel := context.WithTimeout(ctx, callTimeout)
		resp, err := s.sourceClient(m.src).ReleaseDevice(cctx, &ferryv1.ReleaseDeviceRequest{Device: d.Src}, wait)
		cancel()
		s.checks.count(invRelease)
		switch {
		case err != nil && o.collateral:
		case err != nil:
			return violate(invRelease, "ReleaseDevice %s after the migration succeeded: %v", d.Src, err)
		case resp.GetDevice().GetState() != ferryv1.DeviceState_DEVICE_STATE_RUNNING:
			return violate(invRelease, "ReleaseDevice %s left it in %v", d.Src, resp.GetDevice().GetState())
		}
	}
	return nil
}

// violationReport collects what replays a violation.
func (s *soak) violationReport(v *violation, m *migrationRun, o *outcome) *ViolationReport {
	r := &ViolationReport{Invariant: v.Invariant, Detail: v.Detail, Outcome: o, Logs: map[string]string{}}
	if m != nil {
		r.Migration = m.p
		m.mu.Lock()
		r.Notes = append(r.Notes, m.notes...)
		m.mu.Unlock()
	}
	for _, a := range s.agents() {
		r.Logs[a.name] = a.logTail(120)
	}
	return r
}

// agents are every agent, sources first, in a fixed order.
func (s *soak) agents() []*agent {
	out := []*agent{s.sources[false], s.sources[true]}
	for _, l := range lanes {
		out = append(out, s.dests[l])
	}
	if out[0] == nil {
		return nil
	}
	return out
}

// soakCerts are the run's certificates, from a CA made for it.
type soakCerts struct {
	agent, client peerauth.TLSFiles
}

const (
	agentID  = "spiffe://ferry.soak/agent"
	clientID = "spiffe://ferry.soak/control-plane"
)

// startAgents starts a source per security setting and a destination
// per lane.
func (s *soak) startAgents(ctx context.Context) error {
	ca, err := ephemeralca.New(s.logDir, "ferry soak CA")
	if err != nil {
		return err
	}
	sans := []string{"127.0.0.1", agentID}
	for k := range proxyHosts {
		sans = append(sans, proxyHost(k))
	}
	ag, err := ca.Issue(ephemeralca.Options{}, sans...)
	if err != nil {
		return err
	}
	cl, err := ca.Issue(ephemeralca.Options{Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, clientID)
	if err != nil {
		return err
	}
	s.certs = &soakCerts{agent: peerauth.TLSFiles(ag), client: peerauth.TLSFiles(cl)}
	common := []string{"--allow-sim", "--device-timeout", deviceTimeout.String()}
	sec := func(tls, transfer bool) []string {
		if !tls {
			return []string{"--insecure"}
		}
		a := []string{"--tls-cert", s.certs.agent.Cert, "--tls-key", s.certs.agent.Key, "--tls-ca", s.certs.agent.CA, "--allow-client", clientID}
		if transfer {
			a = append(a, "--allow-peer", agentID)
		}
		return a
	}
	for _, tls := range []bool{false, true} {
		name := "source-plain"
		if tls {
			name = "source-tls"
		}
		args := append(append(append([]string{"source"}, sourceFlags...), common...), sec(tls, false)...)
		s.sources[tls] = &agent{name: name, role: "source", exe: s.cfg.Exe, args: args, logPath: filepath.Join(s.logDir, name+".log")}
	}
	for _, l := range lanes {
		name := "dest-" + l.String()
		args := append(append(append([]string{"dest"}, destFlags...), common...), sec(l.TLS, true)...)
		args = append(args, "--memory-budget", fmt.Sprint(s.cfg.destBudget()))
		s.dests[l] = &agent{name: name, role: "dest", exe: s.cfg.Exe, args: args, logPath: filepath.Join(s.logDir, name+".log"), data: l.Direct}
	}
	for _, a := range s.agents() {
		s.restartMu[a] = &sync.Mutex{}
		if err := a.start(ctx); err != nil {
			return err
		}
		creds, err := s.creds(a)
		if err != nil {
			return err
		}
		conn, err := grpc.NewClient(a.Addr(), grpcserver.DialOptions(creds, chunkwire.NewPool())...)
		if err != nil {
			return err
		}
		s.conns[a] = conn
	}
	return nil
}

// creds are the control plane's credentials for a.
func (s *soak) creds(a *agent) (credentials.TransportCredentials, error) {
	if !strings.Contains(strings.Join(a.args, " "), "--tls-cert") {
		return insecure.NewCredentials(), nil
	}
	c, err := peerauth.ClientTLS(s.certs.client, "")
	if err != nil {
		return nil, err
	}
	return credentials.NewTLS(c), nil
}

func (s *soak) destClient(a *agent) ferryv1.DestAgentClient {
	return ferryv1.NewDestAgentClient(s.conns[a])
}
func (s *soak) sourceClient(a *agent) ferryv1.SourceAgentClient {
	return ferryv1.NewSourceAgentClient(s.conns[a])
}

// restart kills an agent and starts it again on its addresses. Its
// baseline goes: a new process is measured afresh after a warm-up.
func (s *soak) restart(ctx context.Context, a *agent) error {
	mu := s.restartMu[a]
	mu.Lock()
	defer mu.Unlock()
	s.mu.Lock()
	delete(s.base, a)
	s.mu.Unlock()
	return a.restart(ctx)
}

// stop kills every agent and closes the clients.
func (s *soak) stop() {
	for _, a := range s.agents() {
		a.kill()
		if c := s.conns[a]; c != nil {
			c.Close()
		}
	}
}

// warmUp runs one migration without faults on every lane of the given
// agents, then takes their baselines: goroutines, fds and RSS of an
// agent that has migrated once and is idle.
func (s *soak) warmUp(ctx context.Context, which []*agent) (*ViolationReport, error) {
	want := map[*agent]bool{}
	for _, a := range which {
		want[a] = true
	}
	var ls []lane
	for _, l := range lanes {
		if want[s.sources[l.TLS]] || want[s.dests[l]] {
			ls = append(ls, l)
		}
	}
	for i, l := range ls {
		slotIdx := i % len(s.planner.slots)
		sl := s.planner.slots[slotIdx]
		p := &migrationPlan{ID: fmt.Sprintf("soak-%d-warmup-%d-%d", s.cfg.Seed, s.planner.next, i), Round: -1, Lane: l,
			Channels: 4, ChunkSize: 1 << 20, MaxBytes: 0, Devices: []devicePlan{{Slot: slotIdx, Src: sl.base, Dst: sl.base, Size: sl.size}}}
		s.planner.next++
		canonical(p)
		m, err := s.newRun(p, 0)
		if err != nil {
			return nil, err
		}
		o, err := m.run(ctx)
		m.closeProxies()
		if err == nil {
			err = s.checkMigration(ctx, m, o)
		}
		if err == nil && o.Phase != "SUCCEEDED" {
			err = violate(invVerified, "a warm-up migration without faults ended %s: %s", o.Phase, o.Message)
		}
		if err == nil {
			err = s.release(ctx, m, o)
		}
		if err != nil {
			var v *violation
			if !errors.As(err, &v) {
				v = violate("soak", "%v", err)
			}
			return s.violationReport(v, m, o), nil
		}
	}
	for _, a := range which {
		// The level the agent settles at once idle: the lowest of a few
		// reads, as goroutines of the warm-up's streams finish.
		var best usage
		for i := range 20 {
			u, err := s.usage(ctx, a)
			if err != nil {
				return nil, err
			}
			if i == 0 || u.Goroutines < best.Goroutines {
				best.Goroutines = u.Goroutines
			}
			if i == 0 || u.FDs < best.FDs {
				best.FDs = u.FDs
			}
			best.RSS = max(best.RSS, u.RSS)
			best.Devices = u.Devices
			t := time.NewTimer(50 * time.Millisecond)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil, ctx.Err()
			case <-t.C:
			}
		}
		s.mu.Lock()
		s.base[a] = best
		s.mu.Unlock()
	}
	return nil, nil
}

// usage is the agent's usage with its open devices counted.
func (s *soak) usage(ctx context.Context, a *agent) (usage, error) {
	u, err := a.usage(ctx)
	if err != nil {
		return u, err
	}
	devs, err := s.listDevices(ctx, a)
	if err != nil {
		return u, err
	}
	u.Devices = len(devs)
	return u, nil
}

func (s *soak) baseline(a *agent) (usage, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, ok := s.base[a]
	return u, ok
}

func (s *soak) noteUsage(a *agent, u usage) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.peak[a]
	p.Goroutines, p.FDs, p.RSS = max(p.Goroutines, u.Goroutines), max(p.FDs, u.FDs), max(p.RSS, u.RSS)
	p.BudgetInUse = max(p.BudgetInUse, u.BudgetInUse)
	p.Devices = max(p.Devices, u.Devices)
	s.peak[a] = p
}

// WriteText prints the report for people.
func (r *Report) WriteText(w io.Writer) {
	fmt.Fprintf(w, "ferry soak: seed %d: %d migration(s) in %d round(s), %.0fs\n", r.Seed, r.Migrations, r.Rounds, r.Seconds)
	fmt.Fprintf(w, "outcomes:  %s\n", counts(r.Outcomes))
	if len(r.Reasons) > 0 {
		fmt.Fprintf(w, "reasons:   %s\n", counts(r.Reasons))
	}
	var fs []string
	for _, c := range faultClasses {
		if n := r.Faults[string(c)]; n > 0 {
			fs = append(fs, fmt.Sprintf("%s %d/%d", c, r.Triggered[string(c)], n))
		}
	}
	fmt.Fprintf(w, "faults (triggered/drawn): %s\n", strings.Join(fs, ", "))
	fmt.Fprintf(w, "checks:    %d (%s)\n", r.ChecksTotal, counts(r.Checks))
	fmt.Fprintf(w, "restarts:  %s\n", counts(r.Restarts))
	fmt.Fprintf(w, "control plane: %s\n", counts(r.ControlPlane))
	names := make([]string, 0, len(r.Usage))
	for n := range r.Usage {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		u, b := r.Usage[n], r.Baselines[n]
		fmt.Fprintf(w, "  %-18s goroutines %d (baseline %d), fds %d (%d), RSS %d MiB (%d MiB), devices open %d (%d)\n",
			n, u.Goroutines, b.Goroutines, u.FDs, b.FDs, u.RSS>>20, b.RSS>>20, u.Devices, b.Devices)
	}
	if v := r.Violation; v != nil {
		fmt.Fprintf(w, "\nVIOLATION %s: %s\n", v.Invariant, v.Detail)
		if v.Migration != nil {
			fmt.Fprintf(w, "migration: %s\n", v.Migration)
		}
		if v.Outcome != nil {
			fmt.Fprintf(w, "outcome:   %s %s %s (destination %s)\n", v.Outcome.Phase, v.Outcome.Reason, v.Outcome.Message, v.Outcome.DestPhase)
		}
		for _, n := range v.Notes {
			fmt.Fprintf(w, "note:      %s\n", n)
		}
		names := make([]string, 0, len(v.Logs))
		for n := range v.Logs {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			fmt.Fprintf(w, "\n--- %s (last lines) ---\n%s\n", n, v.Logs[n])
		}
		fmt.Fprintf(w, "\nreplay: ferry soak --seed %d\n", r.Seed)
	}
	if r.LogDir != "" {
		fmt.Fprintf(w, "agents' logs: %s\n", r.LogDir)
	}
}

// WriteJSON prints the report as one JSON object.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

func counts(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}
