package source

import "testing"

func TestDataHost(t *testing.T) {
	for _, tc := range []struct {
		target, host, authority string
		ok                      bool
	}{
		{"10.0.0.7:7100", "10.0.0.7", "10.0.0.7:7100", true},
		{"dns:///node-3.example:7100", "node-3.example", "node-3.example:7100", true},
		{"passthrough:///127.0.0.1:7100", "127.0.0.1", "127.0.0.1:7100", true},
		{"[fd00::7]:7100", "fd00::7", "[fd00::7]:7100", true},
		// Targets whose host Ferry cannot see through send in Channel
		// messages.
		{"unix:///run/ferry.sock", "", "", false},
		{"dns://8.8.8.8/node-3.example:7100", "", "", false},
		{"node-3.example", "", "", false},
		{":7100", "", "", false},
	} {
		host, authority, ok := dataHost(tc.target)
		if host != tc.host || authority != tc.authority || ok != tc.ok {
			t.Errorf("dataHost(%q) = %q, %q, %v; want %q, %q, %v", tc.target, host, authority, ok, tc.host, tc.authority, tc.ok)
		}
	}
}
