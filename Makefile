# vmnic — KubeVirt VM NICs on Kubernetes nodes. `make help` lists the targets.
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/vmnic/vmnic/pkg/version.Version=$(VERSION)
BIN     := bin
# The tests run the binaries `make build` writes (test/harness.Built): each
# target that runs tests builds them first.
export VMNIC_TEST_BIN := $(CURDIR)/$(BIN)
# Packages whose tests need no root and no namespaces run in test-unit.
UNIT_PKGS := ./pkg/netconf/... ./pkg/proto/... ./pkg/spool/... ./pkg/state/... ./pkg/kubevirt/... ./pkg/fsutil/... \
             ./pkg/apis/... ./plugins/... ./daemon/ ./daemon/install/...

.PHONY: help deps build image demo test test-unit test-integration bench bench-node bench-fleet fleet-run fuzz lint fmt vet clean

help: ## show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

deps: ## install Debian packages and build the test tool binaries and KubeVirt's images (.tools/)
	@bash test/deps.sh

build: ## build vmnic (shim), vmnicd (daemon), vmnicctl (CLI, also kubectl-vmnic) into bin/
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/vmnic ./cmd/vmnicd ./cmd/vmnicctl

image: build ## the node image from the Dockerfile (buildah, podman or docker), as the OCI archive bin/vmnic-image-<version>.tar
	@bash deploy/image/build.sh -t $(VERSION) >/dev/null

demo: ## local demo: wire a VM NIC with vmnic masquerade and boot a real guest on it (installs only what it uses)
	@start=$$(date +%s); bash test/deps.sh demo & deps=$$!; \
	echo "demo: building test/demo (it links vmnicd's packages, so building vmnicd next is mostly cached) ..."; \
	CGO_ENABLED=0 $(GO) build -o $(BIN)/demo ./test/demo && $(MAKE) -s build; rc=$$?; wait $$deps || exit 1; [ $$rc = 0 ] || exit $$rc; \
	echo "demo: packages and build ready in $$(( $$(date +%s) - start ))s"
	$(BIN)/demo

test: deps build vet lint ## the whole suite (as root): vet, format, lint, unit, integration, guest, cluster, a real node (containerd, kubelet, Flannel, Multus; Calico and Cilium with kube-proxy and the real KubeVirt running the examples' VMs), the real KubeVirt on two nodes (every Flannel and Multus example applied as shipped), bounded fuzzing, then the node VM (Debian's kernel: passt over ipvlan, a VLAN underlay, the OVS kernel datapath)
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	FUZZTIME=5s bash test/fuzz.sh
	@# test/watch waits ten minutes and test/virt (two nodes, KubeVirt, emulated guests that migrate) loads
	@# the machine for as long: they run together, then the other packages, which test/virt slowed to failing.
	$(GO) test -count=1 -timeout 40m ./test/watch ./test/virt
	$(GO) test -count=1 -timeout 40m $$($(GO) list ./... | grep -v -e /test/nodevm$$ -e /test/watch$$ -e /test/virt$$)
	$(GO) test -count=1 -timeout 40m ./test/nodevm

fuzz: ## run each fuzz target (FUZZTIME, default 20s)
	bash test/fuzz.sh

test-unit: ## fast tests, no root needed
	$(GO) test -count=1 $(UNIT_PKGS)

test-integration: deps build ## root tests in real namespaces (nftables, DHCP, libcni, guest)
	$(GO) test -count=1 -timeout 30m ./plugins/... ./daemon/... ./pkg/nft/... ./pkg/dhcp/... ./test/...

bench: deps build ## benchmarks (medians, arms interleaved, each next to a peer measured in the same run: ovs-cni, the reference plugins, ovs-vsctl, a minimal Go binary) and their report docs/benchmarks.md: ADD+DEL per mode, pass-through overhead, shim exec, STATUS, daemon RSS, OVSDB vs ovs-vsctl, 250 ports on one bridge, 100 concurrent ADDs/DELs, SIGKILL mid-ADD, live-migration gap (5 runs), fuzz executions (10s per target), make demo on a fresh clone, pod start on the real node with vmnic chained and without, time to Running and migration gaps on the real KubeVirt against its own bindings, a fleet (1,000 Node objects, up to 10,000 VMIs, 200 migrations, 50 vmnicd processes: RSS, objects received, requests, bytes, watches per daemon), the 250-port and OVSDB runs on both datapaths in the node VM
	@mkdir -p .tools/bench
	set -o pipefail; $(GO) test -run '^$$' -bench . -skip 'Scale|Concurrent|Kill' -benchtime 200x -count 1 -timeout 30m ./test/integration/ | tee .tools/bench/integration.txt
	set -o pipefail; $(GO) test -run '^$$' -bench 'Scale|Kill' -benchtime 1x -count 1 -timeout 30m ./test/integration/ | tee .tools/bench/scale.txt
	set -o pipefail; $(GO) test -run '^$$' -bench Concurrent -benchtime 3x -count 1 -timeout 30m ./test/integration/ | tee .tools/bench/concurrency.txt
	set -o pipefail; $(GO) test -run '^$$' -bench . -benchtime 50x -count 1 -timeout 30m ./pkg/ovsdb/ | tee .tools/bench/ovsdb.txt
	-set -o pipefail; $(GO) test -run 'LiveMigration$$' -count 5 -v -timeout 30m ./test/integration/ | tee .tools/bench/migration.txt
	-set -o pipefail; FUZZTIME=10s bash test/fuzz.sh 2>&1 | tee .tools/bench/fuzz.txt
	-set -o pipefail; bash test/demo-fresh.sh 2>&1 | tee .tools/bench/demo.txt
	set -o pipefail; $(GO) test -run '^$$' -bench SandboxStart -benchtime 3x -count 1 -timeout 45m ./test/node/ | tee .tools/bench/node.txt
	-set -o pipefail; $(GO) test -run '^$$' -bench RealKubeVirt -benchtime 1x -count 1 -timeout 60m ./test/virt/ | tee .tools/bench/kubevirt.txt
	$(MAKE) --no-print-directory fleet-run
	$(GO) run ./test/nodevm/bench -o .tools/bench/nodevm.txt
	$(GO) run ./test/benchreport -o docs/benchmarks.md .tools/bench/integration.txt .tools/bench/scale.txt .tools/bench/concurrency.txt \
		.tools/bench/ovsdb.txt .tools/bench/migration.txt .tools/bench/fuzz.txt .tools/bench/demo.txt .tools/bench/node.txt .tools/bench/nodevm.txt .tools/bench/kubevirt.txt \
		.tools/bench/fleet.json

bench-node: deps build ## the real-node benchmark alone (pod start with vmnic chained and without, and the CNI calls of vmnic and of the primary, on Flannel, Calico and Cilium; about 10 minutes): its rows of docs/benchmarks.md, the other rows kept
	@mkdir -p .tools/bench
	set -o pipefail; $(GO) test -run '^$$' -bench SandboxStart -benchtime 3x -count 1 -timeout 45m ./test/node/ | tee .tools/bench/node.txt
	$(GO) run ./test/benchreport -keep -o docs/benchmarks.md .tools/bench/node.txt .tools/bench/fleet.json

bench-fleet: build ## the fleet benchmark alone (a real API server with 1,000 Node objects, up to 10,000 VMIs, 200 migrations, 50 vmnicd processes; about 2 minutes) and the Fleet section of docs/benchmarks.md
	$(MAKE) --no-print-directory fleet-run
	$(GO) run ./test/benchreport -fleet-only -o docs/benchmarks.md .tools/bench/fleet.json

fleet-run:
	@mkdir -p .tools/bench
	set -o pipefail; VMNIC_FLEET_OUT=$(CURDIR)/.tools/bench/fleet.json $(GO) test -run '^$$' -bench Fleet -benchtime 1x -count 1 -timeout 45m ./test/fleet/ | tee .tools/bench/fleet.txt

vet: ## go vet
	$(GO) vet ./...

fmt: ## format the tree (gofumpt, through golangci-lint)
	@bash test/tools/build.sh golangci-lint >/dev/null
	.tools/bin/golangci-lint fmt ./...

lint: ## golangci-lint (version pinned in test/tools; errcheck, govet shadow, staticcheck, gofumpt, no os/exec in product code), the import direction (cmd -> daemon -> plugins -> pkg), and that tests start vmnicd only as its binary or through daemon.Run
	@bash test/tools/build.sh golangci-lint >/dev/null
	.tools/bin/golangci-lint run --allow-parallel-runners ./...
	bash test/imports.sh
	bash test/entrypoint.sh

clean: ## remove build outputs
	rm -rf $(BIN) .tools
