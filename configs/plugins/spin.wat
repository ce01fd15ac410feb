;; spin: loops forever. The host stops it when its fuel runs out (an error
;; event, `timeout`); the node goes on. For tests and demonstrations.
(module
  (memory (export "memory") 1)
  (func (export "fm_alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "fm_process") (param $ptr i32) (param $len i32) (result i64)
    (loop $forever (br $forever))
    (i64.const 0)))
