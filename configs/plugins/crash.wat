;; crash: traps on every call (an error event, `trap`); the node goes on.
(module
  (memory (export "memory") 1)
  (func (export "fm_alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "fm_process") (param $ptr i32) (param $len i32) (result i64)
    unreachable))
