package e2e

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vfio-ferry/ferry/internal/agentproc"
)

// The tests in this file run `ferry dest`, `ferry source` and
// `ferry migrate` as separate processes, as an operator would.

// ferryBuild is the ferry binary, built once per test run (when a test
// needs it) into a directory TestMain removes at the end.
var ferryBuild = agentproc.NewBuild("github.com/vfio-ferry/ferry/cmd/ferry")

func TestMain(m *testing.M) { os.Exit(ferryBuild.Run(m)) }

// ferry returns the path of the ferry binary.
func ferry(t *testing.T) string {
	t.Helper()
	return ferryBuild.Binary(t)
}

// startAgent starts `ferry <role> --listen 127.0.0.1:0 --insecure
// --allow-sim ...`, as the fault tests run it.
func startAgent(t *testing.T, role string, args ...string) *agentproc.Agent {
	t.Helper()
	return runAgent(t, role, append([]string{"--insecure", "--allow-sim"}, args...)...)
}

// runAgent starts `ferry <role> --listen 127.0.0.1:0 --log-format json
// ...` and waits until it logs the address it listens on. The process is
// killed at the end of the test.
func runAgent(t *testing.T, role string, args ...string) *agentproc.Agent {
	t.Helper()
	return agentproc.Start(t, ferry(t), append([]string{role, "--listen", "127.0.0.1:0", "--log-format", "json"}, args...)...)
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
	dst := startAgent(t, "dest", "--data-listen", "127.0.0.1:0").Addr()
	src := startAgent(t, "source").Addr()

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
	dst := startAgent(t, "dest", "--max-buffers", "4", "--max-buffer-bytes", "8MiB").Addr()
	src := startAgent(t, "source").Addr()
	spec := "sim:size=512MiB,seed=31"
	r, code := ferryMigrate(t, src, dst, spec, spec)
	if code != 0 || !r.Verified {
		t.Fatalf("exit %d, result %+v", code, r)
	}
	if r.WindowBytes != 8<<20 || r.DestPeakBufferedBytes == 0 || r.DestPeakBufferedBytes > 8<<20 {
		t.Fatalf("peak buffered %d of a %d window; want at most 8 MiB", r.DestPeakBufferedBytes, r.WindowBytes)
	}
}
