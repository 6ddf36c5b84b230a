// Package agentproc builds the ferry command and runs its agents as real
// processes for tests: a Build compiles the binary once per test run into
// a directory its TestMain removes, and Start runs one agent, waits until
// it listens and keeps its JSON log lines for the test to read.
package agentproc

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// Build is a Go command built at most once per test run, the first time a
// test asks for it. Run owns the directory the binary is built into.
type Build struct {
	pkg string

	dir  string
	once sync.Once
	path string
	err  error
}

// NewBuild returns a Build of the command with import path pkg.
func NewBuild(pkg string) *Build { return &Build{pkg: pkg} }

// Run is the body of a TestMain: it makes the build directory, runs the
// tests and removes the directory. It returns the tests' exit code.
func (b *Build) Run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "ferry-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	b.dir = dir
	defer os.RemoveAll(dir)
	return m.Run()
}

// Binary returns the path of the built command, building it the first
// time; a failed build fails tb, and every later caller.
func (b *Build) Binary(tb testing.TB) string {
	tb.Helper()
	b.once.Do(func() {
		if b.dir == "" {
			b.err = errors.New("agentproc: Binary called without Build.Run in TestMain")
			return
		}
		b.path, b.err = build(tb.Context(), b.dir, b.pkg)
	})
	if b.err != nil {
		tb.Fatal(b.err)
	}
	return b.path
}

// build compiles pkg, without cgo, into dir and returns the binary's path.
func build(ctx context.Context, dir, pkg string) (string, error) {
	bin := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %v\n%s", pkg, err, out)
	}
	return bin, nil
}

// Agent is one running agent process.
type Agent struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed once the process is reaped

	mu                            sync.Mutex
	addr, healthAddr, metricsAddr string
	lines                         []map[string]any // its JSON log lines so far
}

// Start runs bin with args (the role first, then its flags, which must
// include --log-format=json) and waits until it logs "agent listening".
// It fails tb with the log if the process exits first. The process is
// killed at the end of the test if it still runs.
func Start(tb testing.TB, bin string, args ...string) *Agent {
	tb.Helper()
	cmd := exec.Command(bin, args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	a := &Agent{cmd: cmd, exited: make(chan struct{})}
	listening := make(chan struct{})
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		a.read(stderr, listening)
	}()
	// Wait only once the log is read to its end (Wait closes the pipe).
	go func() {
		<-readDone
		cmd.Wait()
		close(a.exited)
	}()
	tb.Cleanup(a.Kill)
	select {
	case <-listening:
	case <-a.exited:
		tb.Fatalf("%s %s exited before listening:\n%s", filepath.Base(bin), strings.Join(args, " "), a.Log())
	}
	return a
}

// read keeps the log lines of r and the addresses they name, and closes
// listening at the line that says the agent listens.
func (a *Agent) read(r io.Reader, listening chan<- struct{}) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		var l map[string]any
		if json.Unmarshal(sc.Bytes(), &l) != nil {
			l = map[string]any{"msg": "not JSON: " + sc.Text()}
		}
		addr, _ := l["address"].(string)
		a.mu.Lock()
		a.lines = append(a.lines, l)
		switch l["msg"] {
		case "health listening":
			a.healthAddr = addr
		case "metrics listening":
			a.metricsAddr = addr
		case "agent listening":
			a.addr = addr
		}
		a.mu.Unlock()
		if l["msg"] == "agent listening" {
			close(listening)
		}
	}
	io.Copy(io.Discard, r)
}

// Addr is the address the agent's gRPC API listens on.
func (a *Agent) Addr() string { return a.get(&a.addr) }

// HealthAddr is the address of its health service, if it logged one
// before it listened.
func (a *Agent) HealthAddr() string { return a.get(&a.healthAddr) }

// MetricsAddr is the address of its metrics page, if it logged one before
// it listened.
func (a *Agent) MetricsAddr() string { return a.get(&a.metricsAddr) }

func (a *Agent) get(s *string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return *s
}

// Logged reports whether the agent logged a line with this msg.
func (a *Agent) Logged(msg string) bool {
	return a.loggedMsg(func(m string) bool { return m == msg })
}

// LoggedPrefix reports whether the agent logged a line whose msg starts
// with prefix.
func (a *Agent) LoggedPrefix(prefix string) bool {
	return a.loggedMsg(func(m string) bool { return strings.HasPrefix(m, prefix) })
}

func (a *Agent) loggedMsg(match func(string) bool) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, l := range a.lines {
		if m, ok := l["msg"].(string); ok && match(m) {
			return true
		}
	}
	return false
}

// Log returns the log lines so far, one JSON object a line.
func (a *Agent) Log() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var b strings.Builder
	for _, l := range a.lines {
		j, _ := json.Marshal(l)
		b.Write(j)
		b.WriteByte('\n')
	}
	return b.String()
}

// Signal sends sig to the agent, failing tb if it cannot.
func (a *Agent) Signal(tb testing.TB, sig os.Signal) {
	tb.Helper()
	if err := a.cmd.Process.Signal(sig); err != nil {
		tb.Fatal(err)
	}
}

// Kill ends the agent with SIGKILL, as a crash would, and waits until it
// is gone. Killing an agent that has exited does nothing.
func (a *Agent) Kill() {
	a.cmd.Process.Kill()
	<-a.exited
}

// Wait waits for the agent to exit and returns its exit code.
func (a *Agent) Wait() int {
	<-a.exited
	return a.cmd.ProcessState.ExitCode()
}
