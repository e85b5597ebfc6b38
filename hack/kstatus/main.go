// Command covi-kstatus prints what Flux's kstatus library (sigs.k8s.io/cli-utils)
// computes for one live object: the status Flux waits on (InProgress, Current,
// Failed, Terminating, NotFound) and its message, as one JSON line.
//
//	covi-kstatus --kubeconfig FILE GROUP/VERSION/RESOURCE [NAMESPACE/]NAME
//
// The test suite runs it against the test bed to check that every covi kind reads
// correctly; hack/build-tools.sh builds it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type answer struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	kubeconfig := flag.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig file")
	flag.Parse()
	if flag.NArg() != 2 {
		fail("usage: covi-kstatus --kubeconfig FILE GROUP/VERSION/RESOURCE [NAMESPACE/]NAME")
	}
	parts := strings.Split(flag.Arg(0), "/")
	if len(parts) != 3 {
		fail("resource must be GROUP/VERSION/RESOURCE, got %q", flag.Arg(0))
	}
	gvr := schema.GroupVersionResource{Group: parts[0], Version: parts[1], Resource: parts[2]}
	namespace, name := "", flag.Arg(1)
	if i := strings.Index(name, "/"); i >= 0 {
		namespace, name = name[:i], name[i+1:]
	}
	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fail("loading %s: %v", *kubeconfig, err)
	}
	client, err := dynamic.NewForConfig(config)
	if err != nil {
		fail("client: %v", err)
	}
	object, err := client.Resource(gvr).Namespace(namespace).Get(context.Background(), name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		emit(answer{Status: status.NotFoundStatus.String(), Message: err.Error()})
		return
	}
	if err != nil {
		fail("reading %s %s: %v", gvr.Resource, flag.Arg(1), err)
	}
	result, err := status.Compute(object)
	if err != nil {
		fail("computing the status: %v", err)
	}
	emit(answer{Status: result.Status.String(), Message: result.Message})
}

func emit(a answer) {
	if err := json.NewEncoder(os.Stdout).Encode(a); err != nil {
		fail("writing: %v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "covi-kstatus: "+format+"\n", args...)
	os.Exit(2)
}
