//go:build race

package source

// raceEnabled is whether the race detector is on.
const raceEnabled = true
