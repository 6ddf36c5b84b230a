package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	"github.com/vfio-ferry/ferry/internal/buildinfo"
)

// runVersion prints the build: the same as the agents' ferry_build_info.
func runVersion(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("version", stderr, "[--json]")
	asJSON := fs.Bool("json", false, "print one JSON object (version, revision, modified, time, go)")
	if err := parse(fs, args); err != nil {
		return err
	}
	b := buildinfo.Read()
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			Version  string `json:"version"`
			Revision string `json:"revision"`
			Modified bool   `json:"modified"`
			Time     string `json:"time,omitempty"`
			Go       string `json:"go"`
		}{b.Version, b.Revision, b.Modified, b.Time, b.GoVersion})
	}
	line := fmt.Sprintf("ferry %s (revision %s", b.Version, b.ShortRevision())
	if b.Time != "" {
		line += ", " + b.Time
	}
	_, err := fmt.Fprintf(stdout, "%s, %s)\n", line, b.GoVersion)
	return err
}
