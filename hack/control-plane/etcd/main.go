// Same entry point as upstream etcd's main.go; `go install` of etcd itself is refused
// because its module has replace directives.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
