package bench

import (
	"strings"
	"testing"
)

func TestParseCPUModel(t *testing.T) {
	for _, c := range []struct{ name, in, want string }{
		{"first CPU's block", "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: Other\n", "AMD EPYC, family 25 model 1"},
		{"no family", "model name\t: Some CPU\n", "Some CPU"},
		{"no model name", "processor\t: 0\nBogoMIPS\t: 50.00\n", "unknown"},
		{"empty", "", "unknown"},
	} {
		if got := parseCPUModel(strings.NewReader(c.in)); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}
