package bench

import (
	"bufio"
	"io"
	"os"
	"strings"
)

// cpuModel describes the first CPU in /proc/cpuinfo: its model name, with
// its family and model numbers, or "unknown". The machines Ferry is
// measured on are virtual, and the same kind of machine has come on
// different CPUs under one model name (one with AVX-512, one without)
// whose figures differ more than any change does, so each run says which.
func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	return parseCPUModel(f)
}

// parseCPUModel is cpuModel from the text of /proc/cpuinfo.
func parseCPUModel(r io.Reader) string {
	fields := map[string]string{}
	s := bufio.NewScanner(r)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if !ok {
			if len(fields) > 0 {
				break // the end of the first CPU's block
			}
			continue
		}
		fields[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	name := fields["model name"]
	if name == "" {
		return "unknown"
	}
	if fam, model := fields["cpu family"], fields["model"]; fam != "" && model != "" {
		name += ", family " + fam + " model " + model
	}
	return name
}
