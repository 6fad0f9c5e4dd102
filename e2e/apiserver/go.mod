// The wrapper that builds kube-apiserver and kubectl from k8s.io/kubernetes (see e2e/build.sh).
// build.sh copies this file into its cache, adds one replace per staging module (k8s.io/api,
// k8s.io/apiserver, ...) derived from k8s.io/kubernetes's own go.mod, and builds there.
module book-controller.example/e2e/apiserver

go 1.26.0

require k8s.io/kubernetes v1.37.2
