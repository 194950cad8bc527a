// A stand-in for libguestfs.org/libnbd, which the Go module proxy does not
// serve (and whose cgo binding needs a newer libnbd than Debian 12's). KubeVirt
// v1.8.2 uses it only in virt-launcher's NBD client for backup and
// changed-block tracking; every entry point here fails loudly.
module libguestfs.org/libnbd

go 1.24
