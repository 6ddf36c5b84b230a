package soak

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/dest"
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
	budgetRefused, rivalRefused, rivalWon, inDoubt, commitRace atomic.Int64
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
			"rival_admitted": int(s.stats.rivalWon.Load()), "in_doubt_resolved": int(s.stats.inDoubt.Load()),
			"commit_race_rolled_back": int(s.stats.commitRace.Load())}
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
		if err != nil && ctx.Err() != nil {
			// Interrupted between migrations: report what ran.
			return finish(nil)
		}
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
	// Another migration's fault may restart the source while its devices
	// are given back: a new process holds no device, so what it cut off
	// needs no release (the devices-idle check reads the new process).
	epoch := m.src.epoch()
	for _, d := range m.p.Devices {
		cctx, cancel := context.WithTimeout(ctx, callTimeout)
		resp, err := s.sourceClient(m.src).ReleaseDevice(cctx, &ferryv1.ReleaseDeviceRequest{Device: d.Src}, wait)
		cancel()
		s.checks.count(invRelease)
		switch {
		case err != nil && (o.collateral || m.src.epoch() != epoch):
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
