package buildinfo

import (
	"runtime/debug"
	"testing"
)

func TestFromBuildInfo(t *testing.T) {
	bi := &debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Version: "v1.2.3"}, Settings: []debug.BuildSetting{
		{Key: "vcs.revision", Value: "0123456789abcdef0123"},
		{Key: "vcs.time", Value: "2026-12-03T12:00:00Z"},
		{Key: "vcs.modified", Value: "true"},
	}}
	got := fromBuildInfo(bi)
	want := Info{Version: "v1.2.3", Revision: "0123456789abcdef0123", Modified: true, Time: "2026-12-03T12:00:00Z", GoVersion: "go1.26.0"}
	if got != want {
		t.Fatalf("fromBuildInfo = %+v, want %+v", got, want)
	}
	if s := got.ShortRevision(); s != "0123456789ab-dirty" {
		t.Errorf("ShortRevision = %q", s)
	}
	if s := fromBuildInfo(&debug.BuildInfo{}).ShortRevision(); s != "unknown" {
		t.Errorf("ShortRevision without a revision = %q", s)
	}
	if v := fromBuildInfo(&debug.BuildInfo{}).Version; v != "(devel)" {
		t.Errorf("Version without one = %q", v)
	}
}
