package soak

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// agent is one agent process of the soak: `ferry dest` or `ferry
// source`, this binary re-executed. A kill and a restart keep its
// addresses, so sources and proxies that name it reach the new process.
type agent struct {
	name    string   // "dest-tls-direct", "source-plain", ...
	role    string   // "source" or "dest"
	data    bool     // a destination serving direct data connections
	exe     string   // the ferry binary
	args    []string // role and flags, without the listen addresses
	logPath string   // every line of every process it ran, appended

	mu           sync.Mutex
	cmd          *exec.Cmd
	exited       chan struct{} // closed once the current process is reaped
	addr         string        // gRPC listen address, fixed after the first start
	dataAddr     string        // direct data listener, for a destination with one
	metricsAddr  string        // metrics page; changes with every start
	tail         []string      // the last log lines, for a violation's report
	races        []string      // race detector reports (a race-built binary)
	untranslated []string      // access-log lines of calls that ended UNKNOWN: an error without a gRPC status
	panics       []string      // "panic in handler" lines
	restarts     int
}

// tailLines is how many log lines an agent keeps for a report.
const tailLines = 4000

// agentStartTimeout bounds how long an agent may take to listen.
const agentStartTimeout = 30 * time.Second

// start runs the agent's process and waits until it listens. The first
// start picks free ports; later ones listen where the first did.
func (a *agent) start(ctx context.Context) error {
	a.mu.Lock()
	listen, dataListen := a.addr, a.dataAddr
	a.mu.Unlock()
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	if dataListen == "" {
		dataListen = "127.0.0.1:0"
	}
	args := append([]string{}, a.args...)
	args = append(args, "--listen", listen, "--metrics-listen", "127.0.0.1:0", "--log-format", "json")
	if a.data {
		args = append(args, "--data-listen", dataListen)
	}
	log, err := os.OpenFile(a.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(log, "{\"msg\":\"soak: starting\",\"args\":%q}\n", strings.Join(args, " "))
	cmd := exec.Command(a.exe, args...)
	// A SIGQUIT (dumpGoroutines) prints every goroutine's stack.
	cmd.Env = append(os.Environ(), "GOTRACEBACK=all")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		log.Close()
		return err
	}
	if err := cmd.Start(); err != nil {
		log.Close()
		return fmt.Errorf("start %s: %w", a.name, err)
	}
	exited := make(chan struct{})
	listening := make(chan struct{})
	a.mu.Lock()
	a.cmd, a.exited = cmd, exited
	a.mu.Unlock()
	go func() {
		a.read(stderr, log, listening)
		log.Close()
		cmd.Wait()
		close(exited)
	}()
	timer := time.NewTimer(agentStartTimeout)
	defer timer.Stop()
	select {
	case <-listening:
		return nil
	case <-exited:
		return fmt.Errorf("%s exited before it listened:\n%s", a.name, a.logTail(40))
	case <-timer.C:
		a.kill()
		return fmt.Errorf("%s did not listen within %v:\n%s", a.name, agentStartTimeout, a.logTail(40))
	case <-ctx.Done():
		a.kill()
		return ctx.Err()
	}
}

// read copies the process's log to log, keeps its tail and the addresses
// it names, and closes listening at "agent listening".
func (a *agent) read(r io.Reader, log io.Writer, listening chan<- struct{}) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	inRace := false
	for sc.Scan() {
		line := sc.Text()
		fmt.Fprintln(log, line)
		var l struct {
			Msg     string `json:"msg"`
			Address string `json:"address"`
		}
		isJSON := json.Unmarshal(sc.Bytes(), &l) == nil
		a.mu.Lock()
		a.tail = append(a.tail, line)
		if len(a.tail) > tailLines {
			a.tail = a.tail[len(a.tail)-tailLines:]
		}
		switch {
		case !isJSON && strings.Contains(line, "WARNING: DATA RACE"):
			inRace = true
			a.races = append(a.races, line)
		case !isJSON && inRace:
			a.races[len(a.races)-1] += "\n" + line
			if line == "==================" {
				inRace = false
			}
		}
		if isJSON && l.Msg == "finished call" && strings.Contains(line, `"grpc.code":"Unknown"`) {
			a.untranslated = append(a.untranslated, line)
		}
		if isJSON && l.Msg == "panic in handler" {
			a.panics = append(a.panics, line)
		}
		var up bool
		switch l.Msg {
		case "agent listening":
			a.addr, up = l.Address, true
		case "direct data listening":
			a.dataAddr = l.Address
		case "metrics listening":
			a.metricsAddr = l.Address
		}
		a.mu.Unlock()
		if up {
			close(listening)
		}
	}
	io.Copy(io.Discard, r)
}

// kill ends the process with SIGKILL, as a crash would, and waits until
// it is reaped. Killing an agent that has exited does nothing.
func (a *agent) kill() {
	a.mu.Lock()
	cmd, exited := a.cmd, a.exited
	a.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Kill()
	<-exited
}

// dumpGoroutines ends the process with SIGQUIT, which makes the Go
// runtime print every goroutine's stack into its log, and returns the
// stacks. The soak does it when it stops at a leak.
func (a *agent) dumpGoroutines() string {
	a.mu.Lock()
	cmd, exited := a.cmd, a.exited
	from := len(a.tail)
	a.mu.Unlock()
	if cmd == nil {
		return ""
	}
	cmd.Process.Signal(syscall.SIGQUIT)
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	select {
	case <-exited:
	case <-t.C:
		cmd.Process.Kill()
		<-exited
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if from > len(a.tail) {
		from = 0
	}
	var b strings.Builder
	for _, l := range a.tail[from:] {
		if !strings.HasPrefix(l, "{") {
			b.WriteString(l)
			b.WriteByte('\n')
		}
	}
	return b.String()
}

// restart kills the process and starts another on the same addresses.
func (a *agent) restart(ctx context.Context) error {
	// The epoch moves first: whatever fails from now on may be the
	// restart's doing.
	a.mu.Lock()
	a.restarts++
	a.mu.Unlock()
	a.kill()
	return a.start(ctx)
}

// epoch counts the agent's restarts: a migration that sees it change
// ran across a restart.
func (a *agent) epoch() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.restarts
}

// Addr is the agent's gRPC address.
func (a *agent) Addr() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.addr
}

// dataAddress is a destination's direct data listener, "" for none.
func (a *agent) dataAddress() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.dataAddr
}

// pid is the current process's id, 0 when none runs.
func (a *agent) pid() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil || a.cmd.Process == nil {
		return 0
	}
	select {
	case <-a.exited:
		return 0
	default:
	}
	return a.cmd.Process.Pid
}

// logTail returns the last n log lines, leaving out the access log of
// calls that succeeded.
func (a *agent) logTail(n int) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var t []string
	for i := len(a.tail) - 1; i >= 0 && len(t) < n; i-- {
		l := a.tail[i]
		if strings.Contains(l, `"msg":"finished call"`) && strings.Contains(l, `"grpc.code":"OK"`) {
			continue
		}
		t = append(t, l)
	}
	slices.Reverse(t)
	return strings.Join(t, "\n")
}

// untranslatedCalls returns the calls that ended UNKNOWN and the
// handler panics logged so far.
func (a *agent) untranslatedCalls() (unknown, panics []string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.untranslated...), append([]string(nil), a.panics...)
}

// raceReports returns the race detector's reports so far.
func (a *agent) raceReports() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.races...)
}

// usage is what an agent process holds, as read from outside it.
type usage struct {
	Goroutines  int     `json:"goroutines"`
	FDs         int     `json:"fds"`
	RSS         uint64  `json:"rss_bytes"`
	BudgetInUse float64 `json:"budget_in_use_bytes"` // destinations only
	// Devices is how many devices the agent has open (ListDevices): each
	// has a watchdog goroutine of its own for as long as the registry
	// keeps it open, which is for good.
	Devices int `json:"devices"`
}

// usage reads the process's goroutines and the destination's budget in
// use from its metrics page, and its open fds and RSS from /proc.
func (a *agent) usage(ctx context.Context) (usage, error) {
	pid := a.pid()
	a.mu.Lock()
	metrics := a.metricsAddr
	a.mu.Unlock()
	if pid == 0 {
		return usage{}, fmt.Errorf("%s is not running", a.name)
	}
	var u usage
	m, err := scrape(ctx, metrics)
	if err != nil {
		return usage{}, fmt.Errorf("%s: metrics: %w", a.name, err)
	}
	g, ok := m["go_goroutines"]
	if !ok {
		return usage{}, fmt.Errorf("%s: metrics have no go_goroutines", a.name)
	}
	u.Goroutines = int(g)
	u.BudgetInUse = m["ferry_dest_memory_budget_in_use_bytes"]
	fds, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "fd"))
	if err != nil {
		return usage{}, fmt.Errorf("%s: %w", a.name, err)
	}
	u.FDs = len(fds)
	if u.RSS, err = statusBytes(pid, "VmRSS:"); err != nil {
		return usage{}, fmt.Errorf("%s: %w", a.name, err)
	}
	return u, nil
}

// scrape reads the unlabelled samples of a Prometheus text page.
func scrape(ctx context.Context, addr string) (map[string]float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	m := make(map[string]float64)
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' || strings.Contains(line, "{") {
			continue
		}
		name, val, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		if f, err := strconv.ParseFloat(strings.Fields(val)[0], 64); err == nil {
			m[name] = f
		}
	}
	return m, sc.Err()
}

// statusBytes reads a kB field of /proc/<pid>/status in bytes.
func statusBytes(pid int, field string) (uint64, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, field); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				break
			}
			kib, err := strconv.ParseUint(f[0], 10, 64)
			return kib << 10, err
		}
	}
	return 0, errors.New("no " + field + " in /proc status")
}
