package cluster

import (
	"bufio"
	"bytes"
	"context"
	_ "embed" // KubeVirtCRDs
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"
)

// FieldManager is the server-side apply field manager Apply uses.
const FieldManager = "vmnic-test"

// KubeVirtCRDs is testdata/kubevirt-crds.yaml: minimal CRDs (schema-less,
// with KubeVirt's subresources: none for the VMI) for
// VirtualMachineInstance, VirtualMachine and
// VirtualMachineInstanceMigration in kubevirt.io/v1.
//
//go:embed testdata/kubevirt-crds.yaml
var KubeVirtCRDs []byte

// discoveryWait bounds how long a kind unknown to discovery is retried (a
// CRD just created is served a moment after it is Established).
const discoveryWait = 15 * time.Second

var crdResource = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// Apply creates or updates every object of a YAML (documents separated by
// "---") or JSON manifest, in order, with server-side apply (field manager
// FieldManager, conflicts forced). Namespaced objects without a namespace go
// to "default"; v1 Lists are applied item by item. Like the controller
// manager would, it creates the "default" ServiceAccount of every Namespace
// it applies.
func (c *Cluster) Apply(ctx context.Context, manifest []byte) error {
	_, err := c.apply(ctx, manifest, false)
	return err
}

// ApplyDryRun sends the manifest as Apply does but with dryRun=All: the API
// server validates, defaults and admits every object and stores nothing.
func (c *Cluster) ApplyDryRun(ctx context.Context, manifest []byte) error {
	_, err := c.apply(ctx, manifest, true)
	return err
}

func (c *Cluster) apply(ctx context.Context, manifest []byte, dryRun bool) ([]*unstructured.Unstructured, error) {
	objs, err := Objects(manifest)
	if err != nil {
		return nil, err
	}
	opts := metav1.ApplyOptions{FieldManager: FieldManager, Force: true}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	applied := make([]*unstructured.Unstructured, 0, len(objs))
	for _, obj := range objs {
		what := describe(obj)
		if obj.GetName() == "" {
			return applied, fmt.Errorf("apply %s: metadata.name is required (generateName does not work with apply)", what)
		}
		ri, err := c.ResourceFor(ctx, obj)
		if err != nil {
			return applied, fmt.Errorf("apply %s: %w", what, err)
		}
		out, err := ri.Apply(ctx, obj.GetName(), obj, opts)
		if err != nil {
			return applied, fmt.Errorf("apply %s: %w", what, err)
		}
		applied = append(applied, out)
		if !dryRun && obj.GetAPIVersion() == "v1" && obj.GetKind() == "Namespace" {
			if err := c.ensureDefaultServiceAccount(ctx, obj.GetName()); err != nil {
				return applied, err
			}
		}
	}
	return applied, nil
}

func describe(obj *unstructured.Unstructured) string {
	s := obj.GetAPIVersion() + " " + obj.GetKind() + " "
	if ns := obj.GetNamespace(); ns != "" {
		s += ns + "/"
	}
	return s + obj.GetName()
}

// Objects decodes a YAML (multi-document) or JSON manifest into objects,
// flattening v1 Lists. Empty documents are skipped.
func Objects(manifest []byte) ([]*unstructured.Unstructured, error) {
	var objs []*unstructured.Unstructured
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(manifest)))
	for i := 1; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return objs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("manifest document %d: %w", i, err)
		}
		js, err := utilyaml.ToJSON(doc)
		if err != nil {
			return nil, fmt.Errorf("manifest document %d: %w", i, err)
		}
		if t := bytes.TrimSpace(js); len(t) == 0 || bytes.Equal(t, []byte("null")) {
			continue
		}
		obj, err := runtime.Decode(unstructured.UnstructuredJSONScheme, js)
		if err != nil {
			return nil, fmt.Errorf("manifest document %d: %w", i, err)
		}
		switch o := obj.(type) {
		case *unstructured.Unstructured:
			objs = append(objs, o)
		case *unstructured.UnstructuredList:
			for j := range o.Items {
				objs = append(objs, &o.Items[j])
			}
		default:
			return nil, fmt.Errorf("manifest document %d: unexpected %T", i, obj)
		}
	}
}

// ResourceFor returns the dynamic client for obj's kind, in obj's namespace
// ("default" when a namespaced object has none).
func (c *Cluster) ResourceFor(ctx context.Context, obj *unstructured.Unstructured) (dynamic.ResourceInterface, error) {
	m, err := c.RESTMapping(ctx, obj.GroupVersionKind())
	if err != nil {
		return nil, err
	}
	if m.Scope.Name() != meta.RESTScopeNameNamespace {
		return c.Dynamic.Resource(m.Resource), nil
	}
	ns := obj.GetNamespace()
	if ns == "" {
		ns = metav1.NamespaceDefault
		obj.SetNamespace(ns)
	}
	return c.Dynamic.Resource(m.Resource).Namespace(ns), nil
}

// RESTMapping maps a kind to its resource through discovery. A kind the
// cached discovery does not know is looked up again for up to 15 s: a CRD
// applied just before is served a moment later.
func (c *Cluster) RESTMapping(ctx context.Context, gvk schema.GroupVersionKind) (*meta.RESTMapping, error) {
	deadline := time.Now().Add(discoveryWait)
	for {
		m, err := c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err == nil {
			return m, nil
		}
		if !meta.IsNoMatchError(err) || time.Now().After(deadline) {
			return nil, fmt.Errorf("map %s: %w", gvk, err)
		}
		c.mapper.Reset()
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("map %s: %w (last: %w)", gvk, ctx.Err(), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// InstallCRDs applies the manifests in files (CustomResourceDefinitions, or
// anything Apply takes) and waits until every CRD among them is Established
// and its kinds are served.
func (c *Cluster) InstallCRDs(ctx context.Context, files ...string) error {
	manifests := make([][]byte, 0, len(files))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("install CRDs: %w", err)
		}
		manifests = append(manifests, b)
	}
	return c.InstallCRDManifests(ctx, manifests...)
}

// InstallKubeVirtCRDs installs KubeVirtCRDs as InstallCRDs does.
func (c *Cluster) InstallKubeVirtCRDs(ctx context.Context) error {
	return c.InstallCRDManifests(ctx, KubeVirtCRDs)
}

// InstallCRDManifests is InstallCRDs for manifests in memory.
func (c *Cluster) InstallCRDManifests(ctx context.Context, manifests ...[]byte) error {
	var crds []*unstructured.Unstructured
	for _, m := range manifests {
		objs, err := c.apply(ctx, m, false)
		if err != nil {
			return fmt.Errorf("install CRDs: %w", err)
		}
		for _, o := range objs {
			if o.GetObjectKind().GroupVersionKind().GroupKind() == (schema.GroupKind{Group: "apiextensions.k8s.io", Kind: "CustomResourceDefinition"}) {
				crds = append(crds, o)
			}
		}
	}
	for _, crd := range crds {
		if err := c.waitEstablished(ctx, crd.GetName()); err != nil {
			return err
		}
	}
	c.mapper.Reset()
	for _, crd := range crds {
		group, _, _ := unstructured.NestedString(crd.Object, "spec", "group")
		kind, _, _ := unstructured.NestedString(crd.Object, "spec", "names", "kind")
		versions, _, _ := unstructured.NestedSlice(crd.Object, "spec", "versions")
		for _, v := range versions {
			vm, _ := v.(map[string]any)
			if served, _ := vm["served"].(bool); !served {
				continue
			}
			name, _ := vm["name"].(string)
			if _, err := c.RESTMapping(ctx, schema.GroupVersionKind{Group: group, Version: name, Kind: kind}); err != nil {
				return fmt.Errorf("install CRD %s: %w", crd.GetName(), err)
			}
		}
	}
	return nil
}

// waitEstablished waits (up to 30 s) for the CRD's Established condition.
func (c *Cluster) waitEstablished(ctx context.Context, name string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var last string
	for {
		crd, err := c.Dynamic.Resource(crdResource).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			conds, _, _ := unstructured.NestedSlice(crd.Object, "status", "conditions")
			for _, cd := range conds {
				m, _ := cd.(map[string]any)
				switch {
				case m["type"] == "Established" && m["status"] == "True":
					return nil
				case m["type"] == "NamesAccepted" && m["status"] == "False":
					return fmt.Errorf("CRD %s: names not accepted: %v", name, m["message"])
				}
			}
			last = fmt.Sprintf("conditions %v", conds)
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("CRD %s not Established (%s): %w", name, last, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
