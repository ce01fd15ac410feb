;; echo: returns {"echo": <input>}. A normal plugin, and the smallest
;; complete example of the fluxmesh plugin ABI v1 (schemas/src/plugin_abi.rs).
;;
;; Memory: bytes 0..8 hold the constant `{"echo":`; the input is written at
;; 1024 and the output is built right after it.
(module
  (memory (export "memory") 1)
  (data (i32.const 0) "{\"echo\":")

  ;; A buffer for `len` input bytes, growing memory for input + output.
  (func (export "fm_alloc") (param $len i32) (result i32)
    (local $need i32)
    (local.set $need (i32.add (i32.const 1040) (i32.mul (local.get $len) (i32.const 2))))
    (if (i32.gt_u (local.get $need) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.lt_s
              (memory.grow (i32.sub (i32.add (i32.shr_u (local.get $need) (i32.const 16)) (i32.const 1)) (memory.size)))
              (i32.const 0))
          (then (unreachable)))))
    (i32.const 1024))

  ;; Output = `{"echo":` + input + `}`, right after the input.
  (func (export "fm_process") (param $ptr i32) (param $len i32) (result i64)
    (local $out i32)
    (local.set $out (i32.add (local.get $ptr) (local.get $len)))
    (memory.copy (local.get $out) (i32.const 0) (i32.const 8))
    (memory.copy (i32.add (local.get $out) (i32.const 8)) (local.get $ptr) (local.get $len))
    (i32.store8 (i32.add (i32.add (local.get $out) (i32.const 8)) (local.get $len)) (i32.const 125))
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
      (i64.extend_i32_u (i32.add (local.get $len) (i32.const 9))))))
