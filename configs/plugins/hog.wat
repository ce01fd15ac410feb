;; hog: grows its memory without bound. The host's memory limit makes the
;; growth trap (an error event, `memory`); the node goes on.
(module
  (memory (export "memory") 1)
  (func (export "fm_alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "fm_process") (param $ptr i32) (param $len i32) (result i64)
    (loop $more
      (drop (memory.grow (i32.const 16)))
      (br $more))
    (i64.const 0)))
