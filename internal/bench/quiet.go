package bench

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"
)

// A quiet run. The machine is shared: CPU time other work takes while a
// round runs slows raw TCP more than it slows Ferry and hides Ferry's
// own costs. So each run reads the machine's busy time from /proc/stat
// before and after, takes away its own processes' CPU time (the two
// children's and this process's), and what is left is what others used,
// in cores. A round in which others used more than quietLimit in either
// arm is marked loaded; the medians come from the quiet rounds.

// quietLimit is the most CPU, in cores, others may use in a quiet run.
const quietLimit = 0.1

// clockTicks is the unit of /proc/stat, USER_HZ: 100 on every Linux ABI.
const clockTicks = 100

// cpuStat is the machine's busy CPU time from /proc/stat's "cpu" line:
// user, nice, system, irq, softirq and steal, in seconds.
type cpuStat struct {
	busy float64
	ok   bool
}

// parseProcStat reads the busy time from the contents of /proc/stat.
func parseProcStat(b []byte) (float64, error) {
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := bytes.Fields(line)
	if len(f) < 9 || string(f[0]) != "cpu" {
		return 0, errors.New("/proc/stat: no cpu line")
	}
	var busy uint64
	// user nice system idle iowait irq softirq steal
	for _, i := range []int{1, 2, 3, 6, 7, 8} {
		v, err := strconv.ParseUint(string(f[i]), 10, 64)
		if err != nil {
			return 0, errors.New("/proc/stat: bad cpu line")
		}
		busy += v
	}
	return float64(busy) / clockTicks, nil
}

func readCPUStat() cpuStat {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuStat{}
	}
	busy, err := parseProcStat(b)
	return cpuStat{busy: busy, ok: err == nil}
}

// selfCPU is this process's CPU time, user plus system, in seconds.
func selfCPU() float64 {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// othersMeter measures what others used while one run ran.
type othersMeter struct {
	stat  cpuStat
	self  float64
	start time.Time
}

func startOthers() othersMeter {
	return othersMeter{stat: readCPUStat(), self: selfCPU(), start: time.Now()}
}

// cores is the CPU others used since the meter started, in cores, given
// the run's children's CPU seconds; -1 when /proc/stat cannot tell.
func (m othersMeter) cores(childCPU float64) float64 {
	end := readCPUStat()
	if !m.stat.ok || !end.ok {
		return -1
	}
	return othersCores(end.busy-m.stat.busy, childCPU+selfCPU()-m.self, time.Since(m.start).Seconds())
}

// othersCores is the machine's busy seconds less the run's own, over
// the run's wall time, in cores; never below 0 (the two clocks tick
// apart).
func othersCores(busy, own, wall float64) float64 {
	if wall <= 0 {
		return 0
	}
	return max(0, (busy-own)/wall)
}

// quiet reports whether a round whose arms saw others use a and b cores
// was quiet. An arm not run (or not measurable, -1) does not count
// against it; -1 on both is no evidence of quiet: false.
func quiet(a, b float64, ranA, ranB bool) bool {
	known := false
	for _, c := range []struct {
		v   float64
		ran bool
	}{{a, ranA}, {b, ranB}} {
		if !c.ran || c.v < 0 {
			continue
		}
		if c.v > quietLimit {
			return false
		}
		known = true
	}
	return known
}

// quietSummary says how many rounds were dropped as loaded, and whether
// the figures are a quiet machine's.
func quietSummary(rows []row) string {
	dropped, rounds, loaded := 0, 0, 0
	for _, r := range rows {
		rounds += r.Rounds
		dropped += r.DroppedRounds
		if r.NoQuietRound {
			loaded++
		}
	}
	s := fmt.Sprintf("quiet: %d of %d rounds dropped from the medians (others used more than %.1f core)", dropped, rounds, quietLimit)
	if loaded > 0 {
		s += fmt.Sprintf("; %d channel count(s) had no quiet round: their figures are a LOADED machine's", loaded)
	}
	return s
}
