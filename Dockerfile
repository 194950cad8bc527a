# vmnic node image: the CNI shim, the node daemon and vmnicctl, for the
# DaemonSet. It packs the static binaries `make build` wrote into bin/, the
# usual release pattern: the image holds exactly the binaries the tests ran,
# and building it needs no base image and no network.
#
#   make image                      # make build, then this file with buildah, podman or docker
#   make build && docker build -t vmnic:dev .
#
# The daemon needs no shell, no libc and no userland tools: it programs
# netlink, nftables and OVSDB directly, and in a pod it reads the API
# server's CA from the service-account mount. vmnicctl is there for
# `kubectl exec ... -- vmnicctl status|attachments`.
FROM scratch
COPY bin/vmnic bin/vmnicd bin/vmnicctl /usr/local/bin/
USER 0:0
ENTRYPOINT ["/usr/local/bin/vmnicd"]
