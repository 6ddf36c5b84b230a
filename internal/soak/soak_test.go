package soak

import (
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/agentproc"
)

// ferryBuild is the ferry binary the soak's agents run, built once per
// test run into a directory TestMain removes.
var ferryBuild = agentproc.NewBuild("github.com/vfio-ferry/ferry/cmd/ferry")

func TestMain(m *testing.M) { os.Exit(ferryBuild.Run(m)) }

// The short soak `make test` runs: a fixed seed, so a change that breaks
// it breaks it every time, and a random one, printed, so that every run
// also tries something new. A failure prints the violation, its
// migration and faults, and the agents' logs; `ferry soak --seed S`
// replays it.
func TestShortSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("the soak runs real agent processes for about a minute")
	}
	for _, c := range []struct {
		name string
		seed uint64
	}{
		{"fixed seed", 17},
		{"random seed", rand.Uint64() >> 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Logf("seed %d (replay: ferry soak --seed %d --migrations 16)", c.seed, c.seed)
			rep, err := Run(t.Context(), Config{Exe: ferryBuild.Binary(t), Seed: c.seed, Migrations: 16, Concurrency: 4, FaultProbability: 0.6})
			if rep != nil {
				var b strings.Builder
				rep.WriteText(&b)
				t.Log("\n" + b.String())
			}
			if err != nil {
				t.Fatalf("seed %d: %v", c.seed, err)
			}
			if rep.Migrations != 16 || rep.ChecksTotal == 0 {
				t.Fatalf("%d migrations, %d checks; want 16 and some", rep.Migrations, rep.ChecksTotal)
			}
		})
	}
}

// The same seed draws the same migrations: what a failure's seed
// replays.
func TestSeedDrawsTheSameMigrations(t *testing.T) {
	draw := func(seed uint64) []string {
		rng := rand.New(rand.NewPCG(seed, seed^0x5eed))
		cfg := &Config{Seed: seed, Concurrency: 4, FaultProbability: 0.5}
		pl := &planner{rng: rng, cfg: cfg, slots: newSlots(rng, 20, 1000)}
		var out []string
		for r := range 50 {
			free := map[int]bool{}
			for i := range pl.slots {
				free[i] = true
			}
			for range 1 + rng.IntN(4) {
				p := pl.draw(r, free)
				canonical(p)
				out = append(out, p.String())
			}
		}
		return out
	}
	a, b, c := draw(5), draw(5), draw(6)
	if strings.Join(a, "\n") != strings.Join(b, "\n") {
		t.Fatal("seed 5 drew different migrations twice")
	}
	if strings.Join(a, "\n") == strings.Join(c, "\n") {
		t.Fatal("seeds 5 and 6 drew the same migrations")
	}
	// Every class is drawn in 50 rounds, and every drawn spec parses.
	joined := strings.Join(a, "\n")
	for _, cl := range faultClasses {
		if !strings.Contains(joined, string(cl)+" ") {
			t.Errorf("fault class %s never drawn in 50 rounds", cl)
		}
	}
}

// A device no migration holds is idle only in RUNNING or STOP, free and
// answering.
func TestIdle(t *testing.T) {
	for _, c := range []struct {
		name string
		d    *deviceView
		bad  bool
	}{
		{"running", &deviceView{State: ferryv1.DeviceState_DEVICE_STATE_RUNNING}, false},
		{"stop", &deviceView{State: ferryv1.DeviceState_DEVICE_STATE_STOP}, false},
		{"stop-copy", &deviceView{State: ferryv1.DeviceState_DEVICE_STATE_STOP_COPY}, true},
		{"resuming", &deviceView{State: ferryv1.DeviceState_DEVICE_STATE_RESUMING}, true},
		{"error", &deviceView{State: ferryv1.DeviceState_DEVICE_STATE_ERROR}, true},
		{"pre-copy", &deviceView{State: ferryv1.DeviceState_DEVICE_STATE_PRE_COPY}, true},
		{"owned", &deviceView{State: ferryv1.DeviceState_DEVICE_STATE_RUNNING, Owner: "m-1"}, true},
		{"stuck", &deviceView{State: ferryv1.DeviceState_DEVICE_STATE_RUNNING, Stuck: true}, true},
	} {
		if got := idle(c.d) != ""; got != c.bad {
			t.Errorf("%s: idle says %q", c.name, idle(c.d))
		}
	}
}
