package agentproc

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"testing"
)

// The test binary stands in for an agent when fakeAgent is set: it logs
// as an agent does, or exits at once with "exit", and exits 3 at SIGTERM.
const fakeAgent = "AGENTPROC_FAKE_AGENT"

func TestMain(m *testing.M) {
	switch os.Getenv(fakeAgent) {
	case "":
		os.Exit(m.Run())
	case "exit":
		fmt.Fprintln(os.Stderr, `{"msg":"bad flag"}`)
		os.Exit(2)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	fmt.Fprintln(os.Stderr, `{"msg":"health listening","address":"127.0.0.1:1"}`)
	fmt.Fprintln(os.Stderr, "plain text")
	fmt.Fprintln(os.Stderr, `{"msg":"agent listening","address":"127.0.0.1:2"}`)
	<-sig
	fmt.Fprintln(os.Stderr, `{"msg":"drained: no migration running"}`)
	os.Exit(3)
}

func TestStartSignalWait(t *testing.T) {
	t.Setenv(fakeAgent, "run")
	a := Start(t, os.Args[0], "agent")
	if a.Addr() != "127.0.0.1:2" || a.HealthAddr() != "127.0.0.1:1" || a.MetricsAddr() != "" {
		t.Errorf("addresses %q %q %q", a.Addr(), a.HealthAddr(), a.MetricsAddr())
	}
	if !a.Logged("agent listening") || !a.LoggedPrefix("not JSON: plain") || a.Logged("agent") {
		t.Errorf("log:\n%s", a.Log())
	}
	a.Signal(t, syscall.SIGTERM)
	if code := a.Wait(); code != 3 {
		t.Errorf("exit %d, want 3", code)
	}
	if !a.Logged("drained: no migration running") {
		t.Errorf("the log after the signal was not kept:\n%s", a.Log())
	}
	a.Kill() // a no-op once it has exited
}

// failTB records a Fatal instead of ending the test.
type failTB struct {
	testing.TB
	failed bool
}

func (f *failTB) Fatalf(format string, args ...any) {
	f.failed = true
	f.Logf(format, args...)
	panic(f)
}

func TestStartExitBeforeListening(t *testing.T) {
	t.Setenv(fakeAgent, "exit")
	tb := &failTB{TB: t}
	func() {
		defer func() {
			if r := recover(); r != nil && r != tb {
				panic(r)
			}
		}()
		Start(tb, os.Args[0], "agent")
	}()
	if !tb.failed {
		t.Error("Start returned for a process that exited before listening")
	}
}
