// Health of Maestro objects as outside tools compute it, for the tests:
//
//	kstatus < objects.json          kstatus (sigs.k8s.io/cli-utils/pkg/kstatus/status,
//	                                 the library Flux and kpt use) of each object
//	kstatus -lua check.lua < ...     an Argo CD Lua health check, run by gopher-lua (the
//	                                 VM Argo CD embeds) with the object as the global obj
//
// stdin: a JSON object, a JSON list, or a `kubectl get -o json` List. stdout: one JSON
// line per object, {"name": ..., "status": ..., "message": ...}.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	script := flag.String("lua", "", "file with an Argo CD Lua health check to run instead")
	flag.Parse()
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	var objects []map[string]interface{}
	var one map[string]interface{}
	// utiljson makes whole numbers int64, as the API machinery (and kstatus) expect.
	if err := utiljson.Unmarshal(data, &one); err == nil {
		if items, ok := one["items"].([]interface{}); ok {
			for _, item := range items {
				objects = append(objects, item.(map[string]interface{}))
			}
		} else {
			objects = append(objects, one)
		}
	} else if err := utiljson.Unmarshal(data, &objects); err != nil {
		fail(err)
	}
	var source []byte
	if *script != "" {
		if source, err = os.ReadFile(*script); err != nil {
			fail(err)
		}
	}
	out := json.NewEncoder(os.Stdout)
	for _, obj := range objects {
		u := &unstructured.Unstructured{Object: obj}
		var state, message string
		if source != nil {
			state, message = argoHealth(string(source), obj)
		} else {
			res, err := status.Compute(u)
			if err != nil {
				fail(err)
			}
			state, message = res.Status.String(), res.Message
		}
		if err := out.Encode(map[string]string{
			"name": u.GetName(), "status": state, "message": message,
		}); err != nil {
			fail(err)
		}
	}
}

// argoHealth runs a health script as Argo CD does (util/lua): the object as global obj,
// the returned table's status and message.
func argoHealth(source string, obj map[string]interface{}) (string, string) {
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	for _, lib := range []struct {
		name string
		fn   lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}, {lua.StringLibName, lua.OpenString}, {lua.MathLibName, lua.OpenMath}} {
		L.Push(L.NewFunction(lib.fn))
		L.Push(lua.LString(lib.name))
		L.Call(1, 0)
	}
	L.SetGlobal("obj", toLua(L, obj))
	if err := L.DoString(source); err != nil {
		fail(err)
	}
	result, ok := L.Get(-1).(*lua.LTable)
	if !ok {
		fail(fmt.Errorf("the script returned %s, not a table", L.Get(-1).Type()))
	}
	return lua.LVAsString(result.RawGetString("status")), lua.LVAsString(result.RawGetString("message"))
}

func toLua(L *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case map[string]interface{}:
		t := L.NewTable()
		for key, item := range v {
			t.RawSetString(key, toLua(L, item))
		}
		return t
	case []interface{}:
		t := L.NewTable()
		for _, item := range v {
			t.Append(toLua(L, item))
		}
		return t
	case string:
		return lua.LString(v)
	case float64:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case bool:
		return lua.LBool(v)
	default:
		return lua.LNil
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus:", err)
	os.Exit(1)
}
