# Ferry's build, lint, test and demo targets. `make help` lists them.

GO        ?= go
BUF       := $(GO) tool -modfile=tools/go.mod buf
# A count budget, not a time budget: Go 1.26's fuzz coordinator can fail a
# timed run with "context deadline exceeded" and no crashing input.
FUZZTIME  ?= 20000x
# Packages with fuzz targets, and the targets in each: `pkg:Target`.
FUZZ      := ./pkg/size:FuzzParse ./pkg/vfio:FuzzParseSpec ./pkg/vfio:FuzzSimRecordStream ./pkg/flow:FuzzWindowDelivery \
             ./services/chunkwire:FuzzCodecUnmarshal ./services/chunkwire:FuzzDirectReader ./services/chunkwire:FuzzDecode ./services/wire:FuzzWindowUpdate \
             ./internal/crc32c:FuzzUpdate ./pkg/vmm:FuzzRead ./services/dest:FuzzOpenRequest ./services/dest:FuzzAccept ./services/source:FuzzStartMigration

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

.PHONY: build
build: ## build bin/ferry
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/ferry ./cmd/ferry

.PHONY: demo
demo: ## run the demo: two agents in one process migrate a simulated 1 GiB device
	$(GO) run ./cmd/ferry demo

.PHONY: generate
generate: ## regenerate the Go code from api/proto with buf
	$(BUF) generate

.PHONY: check-generated
check-generated: generate ## fail if the committed generated code is stale
	@git diff --exit-code -- api/proto || (echo "generated code is stale: run 'make generate' and commit"; exit 1)
	@test -z "$$(git status --porcelain -- api/proto)" || (git status --porcelain -- api/proto; echo "untracked generated files: run 'make generate' and commit"; exit 1)

# The last release's protos as a buf image (`buf build -o` at its tag):
# what `make breaking` checks today's against. Replace it at each release.
BREAKING_AGAINST ?= api/compat/v0.1.0.json

.PHONY: breaking
breaking: ## buf breaking: the protos stay wire compatible with the last release (BREAKING_AGAINST)
	$(BUF) breaking --against $(BREAKING_AGAINST)

.PHONY: lint
lint: ## buf lint and format, gofmt, go vet, and a non-Linux build
	$(BUF) lint
	$(BUF) format -d --exit-code
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || (gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1)
	$(GO) vet ./...
	cd deploy && $(GO) vet ./...
	GOOS=darwin $(GO) build ./...

.PHONY: unit
unit: ## run the Go tests (with the race detector); then, without it, the allocation tests and every benchmark once so none rots
	$(GO) test -race -timeout 30m ./...
	$(GO) test -run 'DoesNotAllocate' -bench . -benchtime 1x ./...
	@test -n "$$FERRY_TEST_VFIO_DEVICES" || echo "note: pkg/vfio's kernel tests (TestKernel*) skipped: FERRY_TEST_VFIO_DEVICES is not set; 'make vm-test' runs them"

.PHONY: fuzz
fuzz: ## run every fuzz target for FUZZTIME each
	@for t in $(FUZZ); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$pkg $$name ($(FUZZTIME))"; \
		$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	done

.PHONY: test
test: lint check-generated breaking unit deploy-test fuzz ## everything CI runs: lint, generated-code check, breaking-change check, tests, short fuzzing

IMAGE     ?= ghcr.io/vfio-ferry/ferry
IMAGE_TAG ?= 0.1.0

.PHONY: image
image: ## build the container image $(IMAGE):$(IMAGE_TAG) with docker, podman or buildah, whichever works here
	@if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then b="docker build"; \
	elif command -v podman >/dev/null 2>&1; then b="podman build"; \
	elif command -v buildah >/dev/null 2>&1; then b="buildah bud"; \
	else \
		echo "make image: no container builder here (docker with a running engine, podman or buildah)." >&2; \
		echo "  Install one (apt-get install podman), or build on a machine that has one:" >&2; \
		echo "  docker build -f deploy/Dockerfile -t $(IMAGE):$(IMAGE_TAG) ." >&2; \
		echo "  'make test' checks the image's binary without a builder (deploy/image_test.go)." >&2; \
		exit 1; \
	fi; \
	echo "$$b -f deploy/Dockerfile -t $(IMAGE):$(IMAGE_TAG) ."; \
	$$b -f deploy/Dockerfile -t $(IMAGE):$(IMAGE_TAG) .

.PHONY: deploy-test
deploy-test: ## render and check the Kubernetes manifests; build the image's binary and check it is static
	cd deploy && $(GO) test -count=1 ./...

.PHONY: bench
bench: ## ferry against raw TCP in the same run (docs/performance.md)
	$(GO) build -o bin/ferry ./cmd/ferry && bin/ferry bench

.PHONY: bench-go
bench-go: ## the Go benchmarks of the hot paths
	$(GO) test -run '^$$' -bench . -benchmem ./services/chunkwire ./services/dest ./services/source ./pkg/flow ./pkg/vfio

SOAK_MIGRATIONS ?= 500
SOAK_SEED       ?= 0
SOAK_FLAGS      ?=

.PHONY: soak
soak: ## a long chaos soak (SOAK_MIGRATIONS, default 500; SOAK_SEED, default random) through race-built agents; the short one is in `make test`
	CGO_ENABLED=1 $(GO) build -race -o bin/ferry-race ./cmd/ferry
	bin/ferry-race soak --migrations $(SOAK_MIGRATIONS) --seed $(SOAK_SEED) --log-dir bin/soak-logs $(SOAK_FLAGS)

.PHONY: soak-short
soak-short: ## only the short soak `make test` runs (a fixed seed and a random one)
	$(GO) test -count=1 -run TestShortSoak -v ./internal/soak

.PHONY: vm-test
vm-test: ## boot Debian's 6.1 and 6.12 kernels under QEMU and migrate real VFIO (mdev) device state in them, stop-copy and pre-copy
	bash test/vm/run.sh

.PHONY: clean
clean: ## remove build outputs
	rm -rf bin
