package main

import (
	"bytes"
	"io"
	"strings"
	"testing"
)

// The demo's banner claims nothing about how the chunks will travel: the
// summary says how they did, from the migration's direct_data.
func TestDemoSaysHowChunksTravelled(t *testing.T) {
	var out bytes.Buffer
	if err := runDemo(t.Context(), []string{"--size", "8MiB", "--channels", "2"}, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	banner, summary, _ := strings.Cut(out.String(), "\n")
	if strings.Contains(banner, "chunks") {
		t.Errorf("the banner claims how the chunks travel before they did: %q", banner)
	}
	if !strings.Contains(summary, "chunks of 1MiB on direct data connections") {
		t.Errorf("the summary does not say the chunks travelled on direct data connections:\n%s", summary)
	}
}
