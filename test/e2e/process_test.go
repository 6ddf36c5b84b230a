package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// The tests in this file run `ferry dest`, `ferry source` and
// `ferry migrate` as separate processes, as an operator would.

// The ferry binary, built once per test run (when a test needs it) into
// a directory TestMain removes at the end.
var (
	buildOnce sync.Once
	binDir    string
	ferryBin  string
	buildErr  error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "ferry-e2e")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// ferry builds the ferry binary once per test run.
func ferry(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		ferryBin = filepath.Join(binDir, "ferry")
		out, err := exec.Command("go", "build", "-o", ferryBin, "github.com/vfio-ferry/ferry/cmd/ferry").CombinedOutput()
		if err != nil {
			buildErr = &buildError{err: err, out: string(out)}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return ferryBin
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return "go build ferry: " + e.err.Error() + "\n" + e.out }

// proc is a running agent process.
type proc struct {
	cmd  *exec.Cmd
	addr string
	done chan struct{}
}

// kill ends the process with SIGKILL, as a crash would.
func (p *proc) kill(t *testing.T) {
	t.Helper()
	p.cmd.Process.Kill()
	<-p.done
}

// startAgent starts `ferry <role> --listen 127.0.0.1:0 --insecure
// --allow-sim ...`, as the fault tests run it.
func startAgent(t *testing.T, role string, args ...string) *proc {
	t.Helper()
	return runAgent(t, role, append([]string{"--insecure", "--allow-sim"}, args...)...)
}

// runAgent starts `ferry <role> --listen 127.0.0.1:0 --log-format json
// ...` and waits until it logs the address it listens on. The process is
// stopped with SIGINT at the end of the test.
func runAgent(t *testing.T, role string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(ferry(t), append([]string{role, "--listen", "127.0.0.1:0", "--log-format", "json"}, args...)...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	sc := bufio.NewScanner(stderr)
	var lines []string
	for sc.Scan() {
		lines = append(lines, sc.Text())
		var line struct {
			Msg     string `json:"msg"`
			Address string `json:"address"`
		}
		if json.Unmarshal(sc.Bytes(), &line) == nil && line.Msg == "agent listening" {
			p.addr = line.Address
			break
		}
	}
	go func() {
		for sc.Scan() { // keep draining the log
		}
		cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		<-p.done
	})
	if p.addr == "" {
		<-p.done
		t.Fatalf("ferry %s exited before listening:\n%s", role, strings.Join(lines, "\n"))
	}
	return p
}

type migrateResult struct {
	Verified              bool   `json:"verified"`
	Bytes                 uint64 `json:"bytes"`
	Channels              uint32 `json:"channels"`
	DestPeakBufferedBytes uint64 `json:"dest_peak_buffered_bytes"`
	WindowBytes           uint64 `json:"window_bytes"`
	DirectData            bool   `json:"direct_data"`
	Error                 *struct {
		Code, Reason, Message string
	} `json:"error"`
	DeviceResults []struct {
		SourceState string `json:"source_state"`
		DestState   string `json:"dest_state"`
		Error       string `json:"error"`
	} `json:"device_results"`
}

func ferryMigrate(t *testing.T, src, dst, srcDev, dstDev string) (migrateResult, int) {
	t.Helper()
	cmd := exec.Command(ferry(t), "migrate", "--source", src, "--dest", dst, "--src-device", srcDev, "--dest-device", dstDev,
		"--channels", "4", "--insecure", "--json")
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	var r migrateResult
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatalf("ferry migrate printed no JSON (exit %d): %v\nstdout: %s\nstderr: %s", code, err, out.String(), errOut.String())
	}
	return r, code
}

func TestSeparateProcesses(t *testing.T) {
	dst := startAgent(t, "dest", "--data-listen", "127.0.0.1:0").addr
	src := startAgent(t, "source").addr

	t.Run("512MiB bit-exact", func(t *testing.T) {
		spec := "sim:size=512MiB,seed=21"
		r, code := ferryMigrate(t, src, dst, spec, spec)
		if code != 0 || !r.Verified || r.Bytes != 512<<20 || r.Channels != 4 || !r.DirectData {
			t.Fatalf("exit %d, result %+v", code, r)
		}
	})

	t.Run("another seed fails and rolls back", func(t *testing.T) {
		r, code := ferryMigrate(t, src, dst, "sim:size=64MiB,seed=22", "sim:size=64MiB,seed=23")
		if code != 1 || r.Verified {
			t.Fatalf("exit %d, verified %v; want exit 1, not verified", code, r.Verified)
		}
		if r.Error == nil || r.Error.Reason != "DEVICE_VERIFY_FAILED" ||
			!strings.Contains(r.Error.Message, "sim:size=64MiB,seed=23") || !strings.Contains(r.Error.Message, "mismatch") {
			t.Fatalf("error %+v does not name the device and the verification", r.Error)
		}
		if d := r.DeviceResults[0]; d.SourceState != "RUNNING" || d.DestState != "RUNNING" {
			t.Fatalf("source %s, destination %s; want both RUNNING (the destination reset)", d.SourceState, d.DestState)
		}
		// `ferry devices` shows the same.
		out, err := exec.Command(ferry(t), "devices", "--agent", src, "--insecure", "--json").Output()
		if err != nil {
			t.Fatal(err)
		}
		var list struct {
			Devices []struct{ Spec, State string }
		}
		if err := json.Unmarshal(out, &list); err != nil {
			t.Fatal(err)
		}
		found := false
		for _, d := range list.Devices {
			if d.Spec == "sim:size=64MiB,seed=22" {
				found = true
				if d.State != "DEVICE_STATE_RUNNING" {
					t.Errorf("ferry devices: source device %s", d.State)
				}
			}
		}
		if !found {
			t.Errorf("ferry devices did not list the source device: %s", out)
		}
	})
}

func TestSmallDestinationWindow(t *testing.T) {
	dst := startAgent(t, "dest", "--max-buffers", "4", "--max-buffer-bytes", "8MiB").addr
	src := startAgent(t, "source").addr
	spec := "sim:size=512MiB,seed=31"
	r, code := ferryMigrate(t, src, dst, spec, spec)
	if code != 0 || !r.Verified {
		t.Fatalf("exit %d, result %+v", code, r)
	}
	if r.WindowBytes != 8<<20 || r.DestPeakBufferedBytes == 0 || r.DestPeakBufferedBytes > 8<<20 {
		t.Fatalf("peak buffered %d of a %d window; want at most 8 MiB", r.DestPeakBufferedBytes, r.WindowBytes)
	}
}
