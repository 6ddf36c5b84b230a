//go:build race

package dest

// raceEnabled is whether the race detector is on.
const raceEnabled = true
