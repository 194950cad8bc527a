# vmnic node image: the CNI shim and the node daemon, for the DaemonSet.
# Build: docker build -t vmnic:dev .
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/vmnic/vmnic/pkg/version.Version=${VERSION}" \
      -o /out/ ./cmd/vmnic ./cmd/vmnicd ./cmd/vmnicctl

# The daemon needs no shell, no libc and no userland tools: it programs
# netlink, nftables and OVSDB directly, and in a pod it reads the API
# server's CA from the service-account mount. The image holds the static
# binaries and nothing else: the shim, the daemon, and vmnicctl for
# `kubectl exec ... -- vmnicctl status|attachments`.
FROM scratch AS runtime
COPY --from=build /out/vmnic /out/vmnicd /out/vmnicctl /usr/local/bin/
USER 0:0
ENTRYPOINT ["/usr/local/bin/vmnicd"]
