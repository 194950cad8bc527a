package node

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/vmnic/vmnic/test/cluster"
)

func hash(b []byte) []byte {
	h := sha256.Sum256(b)
	return h[:]
}

// VmnicImage is the project's node image as users get it: the binaries
// `make build` makes (same flags, this version), packed by the repository's
// Dockerfile with deploy/image/build.sh.
type VmnicImage struct {
	// Repository and Tag are the chart's image.repository and image.tag.
	Repository, Tag string
	// Archive is the OCI archive.
	Archive string
}

// BuildVmnicImage builds the image vmnic:<tag> into dir. Tests on the real
// node use no vmnic binary but the ones in this image.
func BuildVmnicImage(ctx context.Context, dir, tag string) (*VmnicImage, error) {
	root, err := cluster.RepoRoot()
	if err != nil {
		return nil, err
	}
	context := filepath.Join(dir, "image-"+tag)
	bin := filepath.Join(context, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return nil, err
	}
	// The Makefile's build target, into the context's bin/.
	build := exec.CommandContext(ctx, "go", "build", "-trimpath",
		"-ldflags", "-s -w -X github.com/vmnic/vmnic/pkg/version.Version="+tag,
		"-o", bin+"/", "./cmd/vmnic", "./cmd/vmnicd", "./cmd/vmnicctl")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build vmnic binaries: %w: %s", err, b)
	}
	img := &VmnicImage{Repository: "vmnic", Tag: tag, Archive: filepath.Join(dir, "vmnic-image-"+tag+".tar")}
	if err := buildImage(ctx, root, "-n", img.Repository, "-t", tag, "-c", context, "-f", filepath.Join(root, "Dockerfile"), "-o", img.Archive); err != nil {
		return nil, err
	}
	return img, nil
}
