package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vfio-ferry/ferry/internal/shapedlink"
)

// child is one side of a benchmark run: this binary re-executed, so
// its CPU time and peak RSS are measured apart from everything else.
type child struct {
	name   string
	cmd    *exec.Cmd
	out    *bufio.Reader // the child's stdout: JSON lines
	stderr *tailBuffer
}

// startChild starts exe with args, inside network namespace ns when it is
// not nil (`ip netns exec` execs exe, so the child's pid, CPU time and RSS
// are exe's own). Its stdout is read with next; the tail of its stderr
// goes into errors.
func startChild(ctx context.Context, name string, ns *shapedlink.Namespace, exe string, args ...string) (*child, error) {
	var cmd *exec.Cmd
	if ns != nil {
		cmd = ns.Command(ctx, exe, args...)
	} else {
		cmd = exec.CommandContext(ctx, exe, args...)
	}
	cmd.Env = os.Environ()
	cmd.Cancel = func() error { return cmd.Process.Kill() }
	cmd.WaitDelay = 5 * time.Second
	tail := &tailBuffer{max: 8 << 10}
	cmd.Stderr = tail
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return &child{name: name, cmd: cmd, out: bufio.NewReader(out), stderr: tail}, nil
}

// next decodes the child's next JSON line into v.
func (c *child) next(v any) error {
	line, err := c.out.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("%s: no result (%v): %s", c.name, err, c.stderr)
	}
	if err := json.Unmarshal(line, v); err != nil {
		return fmt.Errorf("%s: result %q: %v", c.name, line, err)
	}
	return nil
}

// peakRSS reads the child's VmHWM (peak resident set) while it is alive.
func (c *child) peakRSS() uint64 { return peakRSSOf(strconv.Itoa(c.cmd.Process.Pid)) }

// wait waits for the child to exit and returns its CPU time, user plus
// system, from its rusage.
func (c *child) wait() (cpuSeconds float64, err error) {
	io.Copy(io.Discard, c.out)
	err = c.cmd.Wait()
	st := c.cmd.ProcessState
	if st == nil {
		return 0, fmt.Errorf("%s: %v", c.name, err)
	}
	cpu := (st.UserTime() + st.SystemTime()).Seconds()
	if err != nil {
		return cpu, fmt.Errorf("%s: %v: %s", c.name, err, c.stderr)
	}
	return cpu, nil
}

// kill ends a child that is no longer wanted (after a failure).
func (c *child) kill() {
	c.cmd.Process.Kill()
	c.cmd.Wait()
}

// peakRSSOf is VmHWM of /proc/<pid>/status in bytes ("self" for this
// process), 0 where there is no /proc.
func peakRSSOf(pid string) uint64 {
	b, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				return 0
			}
			kib, _ := strconv.ParseUint(f[0], 10, 64)
			return kib << 10
		}
	}
	return 0
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(bytes.TrimSpace(t.b))
}

// errPeer is how a peer reports a failed transfer in its result line.
func errPeer(msg string) error {
	if msg == "" {
		return nil
	}
	return errors.New(msg)
}
