// Package buildinfo says which build of Ferry is running: the module
// version, the VCS revision and time it was built from, and the Go
// toolchain. `ferry version` prints it and the agents export it as the
// ferry_build_info metric, so an operator can tell which nodes of a fleet
// run which build.
//
// Everything comes from what the Go toolchain stamps into the binary
// (runtime/debug.ReadBuildInfo); nothing is set by a linker flag. A binary
// built with `go build` in a clone has the revision; one built by `go
// run` or from a module proxy may have only the version ("(devel)" when
// built from the main module without a tag).
package buildinfo

import (
	"runtime"
	"runtime/debug"
)

// Info describes one build.
type Info struct {
	// Version is the main module's version: a tag, a pseudo-version, or
	// "(devel)".
	Version string
	// Revision is the VCS commit the binary was built from, "" when the
	// toolchain did not record it; Modified says the work tree had
	// uncommitted changes.
	Revision string
	Modified bool
	// Time is the commit's time (RFC 3339), "" when unknown.
	Time string
	// GoVersion is the toolchain, for example "go1.26.0".
	GoVersion string
}

// Read returns the running binary's build.
func Read() Info {
	info := Info{Version: "(devel)", GoVersion: runtime.Version()}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return info
	}
	return fromBuildInfo(bi)
}

func fromBuildInfo(bi *debug.BuildInfo) Info {
	info := Info{Version: bi.Main.Version, GoVersion: bi.GoVersion}
	if info.Version == "" {
		info.Version = "(devel)"
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			info.Revision = s.Value
		case "vcs.time":
			info.Time = s.Value
		case "vcs.modified":
			info.Modified = s.Value == "true"
		}
	}
	return info
}

// ShortRevision is the revision's first 12 hex digits, with "-dirty" when
// the work tree was modified; "unknown" when none was recorded.
func (i Info) ShortRevision() string {
	r := i.Revision
	if r == "" {
		return "unknown"
	}
	if len(r) > 12 {
		r = r[:12]
	}
	if i.Modified {
		r += "-dirty"
	}
	return r
}
