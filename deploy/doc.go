// Package deploy holds Ferry's Kubernetes manifests (a kustomize base and
// the overlays dev, production and per-node-certs) and its container image (Dockerfile),
// and the tests that check them: every overlay rendered with kustomize's Go
// API and decoded strictly into the Kubernetes types, and the image's
// binary built as the Dockerfile builds it.
//
// It is a Go module of its own so that kustomize's dependencies stay out of
// Ferry's go.mod. Run its tests with `cd deploy && go test ./...`.
package deploy
