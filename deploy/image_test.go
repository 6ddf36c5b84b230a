package deploy

import (
	"bufio"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// stage is one stage of a Dockerfile: its FROM line's image and name, and
// its instructions in order.
type stage struct {
	image, name string
	env         []string // KEY=value, from ENV
	lines       []instruction
}

type instruction struct {
	op, args string
}

// parseDockerfile reads the instructions of a Dockerfile (comments and
// line continuations handled; enough for ours, which the test checks).
func parseDockerfile(t *testing.T, path string) []*stage {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var stages []*stage
	var cont string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "#") || line == "" && cont == "" {
			continue
		}
		if l, ok := strings.CutSuffix(line, "\\"); ok {
			cont += l + " "
			continue
		}
		line, cont = cont+line, ""
		op, args, _ := strings.Cut(line, " ")
		op, args = strings.ToUpper(op), strings.TrimSpace(args)
		if op == "FROM" {
			fields := strings.Fields(args)
			s := &stage{image: fields[0]}
			if len(fields) == 3 && strings.EqualFold(fields[1], "AS") {
				s.name = fields[2]
			}
			stages = append(stages, s)
			continue
		}
		if len(stages) == 0 {
			t.Fatalf("%s: %s before FROM", path, op)
		}
		s := stages[len(stages)-1]
		if op == "ENV" {
			s.env = append(s.env, strings.Fields(args)...)
		}
		s.lines = append(s.lines, instruction{op, args})
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return stages
}

// goBuild is the build line the Dockerfile must have: a static, trimmed
// build of cmd/ferry into /out.
var goBuild = regexp.MustCompile(`^CGO_ENABLED=0 go build (.* )?-trimpath( .*)? -o /out/ferry \./cmd/ferry$`)

// TestImage builds the binary exactly as deploy/Dockerfile does (its ENV and
// its `go build` line, run by a shell in the repository root), then checks
// that it is static and runs with an empty environment, and that the
// final stage runs it as a non-root user.
func TestImage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the ferry binary")
	}
	stages := parseDockerfile(t, "Dockerfile")
	if len(stages) < 2 {
		t.Fatalf("want a multi-stage Dockerfile, got %d stage(s)", len(stages))
	}
	build, final := stages[0], stages[len(stages)-1]

	t.Run("base images", func(t *testing.T) {
		for _, s := range stages {
			if s.image == "scratch" {
				continue
			}
			checkImage(t, s.image)
		}
		if !strings.Contains(build.image, "golang:1.26") {
			t.Errorf("build stage FROM %s: want the project's Go (1.26)", build.image)
		}
	})

	var cmdLine string
	for _, in := range build.lines {
		if in.op == "RUN" && strings.Contains(in.args, "go build") {
			cmdLine = in.args
		}
	}
	if !goBuild.MatchString(cmdLine) {
		t.Fatalf("the build stage's go build line %q does not match %s", cmdLine, goBuild)
	}

	// Run the line as the Dockerfile's shell would, with the stage's ENV,
	// from the repository root (the build context), writing into a
	// temporary /out.
	out := t.TempDir()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", strings.Replace(cmdLine, "/out/ferry", filepath.Join(out, "ferry"), 1))
	cmd.Dir = root
	cmd.Env = append(os.Environ(), build.env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", cmdLine, err, b)
	}
	bin := filepath.Join(out, "ferry")

	t.Run("static", func(t *testing.T) {
		f, err := elf.Open(bin)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for _, p := range f.Progs {
			switch p.Type {
			case elf.PT_INTERP:
				t.Error("the binary has a PT_INTERP program header: it needs a dynamic loader")
			case elf.PT_DYNAMIC:
				t.Error("the binary has a PT_DYNAMIC program header: it is dynamically linked")
			}
		}
		if s := f.Section(".dynamic"); s != nil {
			t.Error("the binary has a .dynamic section")
		}
		if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
			t.Errorf("the binary imports %v", libs)
		}
	})

	t.Run("empty environment", func(t *testing.T) {
		// env -i: nothing inherited, not even PATH or HOME.
		cmd := exec.Command(bin, "help")
		cmd.Env = []string{}
		b, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("env -i ferry help: %v\n%s", err, b)
		}
		if !strings.Contains(string(b), "agent") {
			t.Errorf("ferry help does not list the agent command:\n%s", b)
		}
	})

	t.Run("manifest flags", func(t *testing.T) {
		// Every flag the overlays pass is one `ferry agent` knows, except
		// those of the security work that may not have landed yet.
		cmd := exec.Command(bin, "agent", "-h")
		cmd.Env = []string{}
		b, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("ferry agent -h: %v\n%s", err, b)
		}
		known := map[string]bool{}
		for _, m := range regexp.MustCompile(`(?m)^\s+-([a-z-]+)`).FindAllStringSubmatch(string(b), -1) {
			known[m[1]] = true
		}
		pending := map[string]bool{}
		for _, name := range overlays {
			_, c := render(t, name).agentDaemonSet(t)
			for flag := range flags(t, c.Args) {
				switch {
				case known[flag]:
				case pending[flag]:
					t.Logf("overlays/%s: --%s is not in this binary yet (the security issue adds it)", name, flag)
				default:
					t.Errorf("overlays/%s passes --%s, which `ferry agent` does not know", name, flag)
				}
			}
		}
	})

	t.Run("final stage", func(t *testing.T) {
		var user, entrypoint, copied string
		for _, in := range final.lines {
			switch in.op {
			case "USER":
				user = in.args
			case "ENTRYPOINT":
				entrypoint = in.args
			case "COPY":
				if f := strings.Fields(in.args); len(f) == 3 && f[0] == "--from="+build.name && f[1] == "/out/ferry" {
					copied = f[2]
				}
			}
		}
		uid, _, _ := strings.Cut(user, ":")
		if uid == "" || uid == "0" || uid == "root" {
			t.Errorf("USER %q: the image must run as a non-root user by default", user)
		}
		if copied == "" {
			t.Fatal("the final stage does not copy /out/ferry from the build stage")
		}
		if entrypoint != `["`+copied+`"]` {
			t.Errorf("ENTRYPOINT %s, want [%q]", entrypoint, copied)
		}
	})
}
