// The wrapper that builds etcd (see e2e/build.sh). A module of its own, so that etcd's dependency
// versions do not disturb kube-apiserver's.
module book-controller.example/e2e/etcd

go 1.26.0

require go.etcd.io/etcd/server/v3 v3.7.3
