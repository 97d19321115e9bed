(* ========================================================================= *)
(*  opm.v -- machine-checked facts behind OPM (Optimized Parameter Mapping)   *)
(*           and the exact centred LayerNorm -> RMSNorm conversion.           *)
(*                                                                           *)
(*  Check with:   coqc proofs/opm.v          (Coq 8.16, standard library)     *)
(*  See proofs/opm-derivation.md for the mathematics on paper and            *)
(*  proofs/README.md for the map from Coq names to formulas.                 *)
(*                                                                           *)
(*  Conventions                                                              *)
(*   - Vectors are functions nat -> R; only indices < d are ever read.        *)
(*   - Calibration data is x : nat -> nat -> R, "x t i" = feature i of token  *)
(*     t; tokens t < T, features i < d.                                       *)
(*   - Division is Coq's total "/": x / 0 = 0 (Rinv_0).  Every statement     *)
(*     below says explicitly which quantities must be non-zero.               *)
(* ========================================================================= *)

From Coq Require Import Reals Lra Lia List Permutation.
Import ListNotations.
Open Scope R_scope.

(* Do not write .lia.cache / .nra.cache into the current directory. *)
Unset Lia Cache.
Unset Nra Cache.

(* ------------------------------------------------------------------------- *)
(** * 1. Finite sums                                                          *)
(* ------------------------------------------------------------------------- *)

(** [sumN n f] = f 0 + f 1 + ... + f (n-1); the empty sum (n = 0) is 0. *)
Fixpoint sumN (n : nat) (f : nat -> R) : R :=
  match n with
  | O => 0
  | S k => sumN k f + f k
  end.

Lemma sumN_S n f : sumN (S n) f = sumN n f + f n.
Proof. reflexivity. Qed.

(** Link with the standard library's [sum_f_R0] (which sums f 0 .. f n). *)
Lemma sumN_sum_f_R0 n f : sumN (S n) f = sum_f_R0 f n.
Proof.
  induction n as [|n IH].
  - cbn [sumN sum_f_R0]. ring.
  - rewrite sumN_S, IH. reflexivity.
Qed.

Lemma sumN_ext n f g :
  (forall i, (i < n)%nat -> f i = g i) -> sumN n f = sumN n g.
Proof.
  induction n as [|n IH]; intros H; cbn [sumN]; [reflexivity|].
  rewrite IH by (intros; apply H; lia).
  rewrite H by lia. reflexivity.
Qed.

Lemma sumN_plus n f g :
  sumN n (fun i => f i + g i) = sumN n f + sumN n g.
Proof. induction n as [|n IH]; cbn [sumN]; [ring|rewrite IH; ring]. Qed.

Lemma sumN_minus n f g :
  sumN n (fun i => f i - g i) = sumN n f - sumN n g.
Proof. induction n as [|n IH]; cbn [sumN]; [ring|rewrite IH; ring]. Qed.

Lemma sumN_scal n c f :
  sumN n (fun i => c * f i) = c * sumN n f.
Proof. induction n as [|n IH]; cbn [sumN]; [ring|rewrite IH; ring]. Qed.

Lemma sumN_scal_r n c f :
  sumN n (fun i => f i * c) = sumN n f * c.
Proof. induction n as [|n IH]; cbn [sumN]; [ring|rewrite IH; ring]. Qed.

Lemma sumN_const n c : sumN n (fun _ => c) = INR n * c.
Proof.
  induction n as [|n IH]; cbn [sumN]; [cbn; ring|].
  rewrite IH, S_INR. ring.
Qed.

Lemma sumN_zero n : sumN n (fun _ => 0) = 0.
Proof. rewrite sumN_const. ring. Qed.

Lemma sumN_nonneg n f :
  (forall i, (i < n)%nat -> 0 <= f i) -> 0 <= sumN n f.
Proof.
  induction n as [|n IH]; intros H; cbn [sumN]; [lra|].
  assert (0 <= sumN n f) by (apply IH; intros; apply H; lia).
  assert (0 <= f n) by (apply H; lia).
  lra.
Qed.

Lemma sumN_le n f g :
  (forall i, (i < n)%nat -> f i <= g i) -> sumN n f <= sumN n g.
Proof.
  induction n as [|n IH]; intros H; cbn [sumN]; [lra|].
  assert (sumN n f <= sumN n g) by (apply IH; intros; apply H; lia).
  assert (f n <= g n) by (apply H; lia).
  lra.
Qed.

(** A sum of non-negative terms is zero only if every term is zero. *)
Lemma sumN_nonneg_eq0 n f :
  (forall i, (i < n)%nat -> 0 <= f i) -> sumN n f = 0 ->
  forall i, (i < n)%nat -> f i = 0.
Proof.
  induction n as [|n IH]; intros Hpos Hs i Hi; [lia|].
  cbn [sumN] in Hs.
  assert (H1 : 0 <= sumN n f) by (apply sumN_nonneg; intros; apply Hpos; lia).
  assert (H2 : 0 <= f n) by (apply Hpos; lia).
  destruct (Nat.eq_dec i n) as [->|Hne]; [lra|].
  apply IH; [intros; apply Hpos; lia | lra | lia].
Qed.

(** Exchange of finite sums (discrete Fubini). *)
Lemma sumN_swap n m (h : nat -> nat -> R) :
  sumN n (fun i => sumN m (fun j => h i j)) =
  sumN m (fun j => sumN n (fun i => h i j)).
Proof.
  induction n as [|n IH]; cbn [sumN].
  - symmetry. apply sumN_zero.
  - rewrite IH. rewrite <- sumN_plus. reflexivity.
Qed.

(** Sums over a list, to state invariance under permutations. *)
Definition lsum (l : list R) : R := fold_right Rplus 0 l.

Lemma lsum_app l1 l2 : lsum (l1 ++ l2) = lsum l1 + lsum l2.
Proof. unfold lsum. induction l1 as [|a l1 IH]; cbn; [ring|rewrite IH; ring]. Qed.

Lemma lsum_perm l l' : Permutation l l' -> lsum l = lsum l'.
Proof. unfold lsum. induction 1; cbn; lra. Qed.

Lemma sumN_lsum n f : sumN n f = lsum (map f (seq 0 n)).
Proof.
  induction n as [|n IH]; [reflexivity|].
  rewrite seq_S, map_app, lsum_app, <- IH. cbn. ring.
Qed.

(** Re-indexing a finite sum by a permutation [p] of {0,..,n-1}. *)
Lemma sumN_perm n (p : nat -> nat) f :
  Permutation (map p (seq 0 n)) (seq 0 n) ->
  sumN n (fun i => f (p i)) = sumN n f.
Proof.
  intros Hp. rewrite !sumN_lsum.
  replace (map (fun i => f (p i)) (seq 0 n)) with (map f (map p (seq 0 n)))
    by apply map_map.
  apply lsum_perm, Permutation_map, Hp.
Qed.

(* ------------------------------------------------------------------------- *)
(** * 2. One-dimensional least squares (one OPM coordinate)                   *)
(*                                                                           *)
(*   f(w) = sum_t (a_t - w b_t)^2,   w* = sum_t a_t b_t / sum_t b_t^2.        *)
(* ------------------------------------------------------------------------- *)

Definition ls_obj (n : nat) (a b : nat -> R) (w : R) : R :=
  sumN n (fun t => (a t - w * b t) ^ 2).

Definition ls_opt (n : nat) (a b : nat -> R) : R :=
  sumN n (fun t => a t * b t) / sumN n (fun t => b t ^ 2).

Lemma ls_obj_expand n a b w :
  ls_obj n a b w =
  sumN n (fun t => a t ^ 2) - 2 * w * sumN n (fun t => a t * b t)
  + w ^ 2 * sumN n (fun t => b t ^ 2).
Proof.
  unfold ls_obj. induction n as [|n IH]; cbn [sumN]; [ring|].
  rewrite IH. ring.
Qed.

Lemma sumsq_nonneg n b : 0 <= sumN n (fun t => b t ^ 2).
Proof. apply sumN_nonneg. intros; apply pow2_ge_0. Qed.

Lemma sumsq_eq0 n b :
  sumN n (fun t => b t ^ 2) = 0 -> forall t, (t < n)%nat -> b t = 0.
Proof.
  intros H t Ht.
  assert (E : b t ^ 2 = 0).
  { apply (sumN_nonneg_eq0 n (fun t => b t ^ 2)); auto.
    intros; apply pow2_ge_0. }
  nra.
Qed.

Lemma sumsq_eq0_cross n a b :
  sumN n (fun t => b t ^ 2) = 0 -> sumN n (fun t => a t * b t) = 0.
Proof.
  intros H. rewrite (sumN_ext n _ (fun _ => 0)); [apply sumN_zero|].
  intros t Ht. rewrite (sumsq_eq0 n b H t Ht). ring.
Qed.

(** (c) The gap identity, exact and unconditional:
        f(w) - f(w* ) = (w - w* )^2 * sum_t b_t^2.
    (If sum_t b_t^2 = 0 then every b_t = 0, f is constant, both sides are 0.) *)
Theorem ls_gap n a b w :
  ls_obj n a b w - ls_obj n a b (ls_opt n a b) =
  (w - ls_opt n a b) ^ 2 * sumN n (fun t => b t ^ 2).
Proof.
  rewrite !ls_obj_expand. unfold ls_opt.
  destruct (Req_dec (sumN n (fun t => b t ^ 2)) 0) as [H0|H0].
  - rewrite (sumsq_eq0_cross n a b H0), H0. ring.
  - field. exact H0.
Qed.

(** (a) w* is a global minimiser (for every data set; when sum b^2 = 0 every
    w is a minimiser, see [ls_degenerate]). *)
Theorem ls_opt_minimises n a b w :
  ls_obj n a b (ls_opt n a b) <= ls_obj n a b w.
Proof.
  pose proof (ls_gap n a b w) as G.
  pose proof (sumsq_nonneg n b) as S.
  assert (0 <= (w - ls_opt n a b) ^ 2 * sumN n (fun t => b t ^ 2))
    by (apply Rmult_le_pos; [apply pow2_ge_0|exact S]).
  lra.
Qed.

(** (b) Uniqueness when sum_t b_t^2 > 0. *)
Theorem ls_opt_unique n a b w :
  0 < sumN n (fun t => b t ^ 2) ->
  ls_obj n a b w = ls_obj n a b (ls_opt n a b) -> w = ls_opt n a b.
Proof.
  intros Hpos Heq.
  pose proof (ls_gap n a b w) as G. rewrite Heq in G.
  set (e := w - ls_opt n a b) in G.
  set (S := sumN n (fun t => b t ^ 2)) in G, Hpos.
  assert (E : e ^ 2 * S = 0) by lra.
  apply Rmult_integral in E. destruct E as [E|E]; [|lra].
  assert (e = 0) by nra.
  unfold e in *. lra.
Qed.

(** (a)+(b): when sum_t b_t^2 > 0, w is a minimiser iff w = w*. *)
Theorem ls_minimiser_iff n a b w :
  0 < sumN n (fun t => b t ^ 2) ->
  ((forall v, ls_obj n a b w <= ls_obj n a b v) <-> w = ls_opt n a b).
Proof.
  intros Hpos. split.
  - intros Hmin. apply ls_opt_unique; [exact Hpos|].
    apply Rle_antisym; [apply Hmin|apply ls_opt_minimises].
  - intros ->. apply ls_opt_minimises.
Qed.

(** Degenerate case: sum_t b_t^2 = 0 makes f constant, so every w minimises. *)
Theorem ls_degenerate n a b :
  sumN n (fun t => b t ^ 2) = 0 ->
  forall w v, ls_obj n a b w = ls_obj n a b v.
Proof.
  intros H w v. rewrite !ls_obj_expand, (sumsq_eq0_cross n a b H), H. ring.
Qed.

(** First-order condition (normal equation): sum_t b_t (a_t - w b_t) = 0. *)
Theorem ls_normal_equation n a b w :
  0 < sumN n (fun t => b t ^ 2) ->
  (sumN n (fun t => b t * (a t - w * b t)) = 0 <-> w = ls_opt n a b).
Proof.
  intros Hpos.
  assert (E : sumN n (fun t => b t * (a t - w * b t)) =
              sumN n (fun t => a t * b t) - w * sumN n (fun t => b t ^ 2)).
  { rewrite (sumN_ext n _ (fun t => a t * b t - w * b t ^ 2))
      by (intros; ring).
    rewrite sumN_minus, sumN_scal. reflexivity. }
  rewrite E. unfold ls_opt.
  set (S := sumN n (fun t => b t ^ 2)) in *.
  set (P := sumN n (fun t => a t * b t)).
  split; intros H.
  - assert (HP : P = w * S) by lra. rewrite HP. field. lra.
  - rewrite H. field. lra.
Qed.

(** (d) Exact fit: if a_t = g b_t for every t then w* = g. *)
Theorem ls_opt_exact n a b g :
  sumN n (fun t => b t ^ 2) <> 0 ->
  (forall t, (t < n)%nat -> a t = g * b t) -> ls_opt n a b = g.
Proof.
  intros H Ha. unfold ls_opt.
  rewrite (sumN_ext n (fun t => a t * b t) (fun t => g * b t ^ 2))
    by (intros t Ht; rewrite Ha by exact Ht; ring).
  rewrite sumN_scal. field. exact H.
Qed.

(** ... and then the residual is exactly zero (this needs no hypothesis). *)
Theorem ls_exact_fit_zero n a b g :
  (forall t, (t < n)%nat -> a t = g * b t) -> ls_obj n a b g = 0.
Proof.
  intros Ha. unfold ls_obj.
  rewrite (sumN_ext n _ (fun _ => 0)); [apply sumN_zero|].
  intros t Ht. rewrite Ha by exact Ht. ring.
Qed.

(** (e) Linearity of w* in the target: for a_t = g c_t + beta e_t,
        w* = g * (sum c b / sum b^2) + beta * (sum e b / sum b^2).
    This is the A/B decomposition w*_i = g_i A_i + b_i B_i. Unconditional. *)
Theorem ls_opt_linear n a b c e g beta :
  (forall t, (t < n)%nat -> a t = g * c t + beta * e t) ->
  ls_opt n a b = g * ls_opt n c b + beta * ls_opt n e b.
Proof.
  intros Ha. unfold ls_opt.
  rewrite (sumN_ext n (fun t => a t * b t)
             (fun t => g * (c t * b t) + beta * (e t * b t)))
    by (intros t Ht; rewrite Ha by exact Ht; ring).
  rewrite sumN_plus, !sumN_scal. unfold Rdiv. ring.
Qed.

(** The objective and its minimiser only depend on the data at t < n. *)
Lemma ls_obj_ext n a b a' b' w :
  (forall t, (t < n)%nat -> a t = a' t /\ b t = b' t) ->
  ls_obj n a b w = ls_obj n a' b' w.
Proof.
  intros H. unfold ls_obj. apply sumN_ext. intros t Ht.
  destruct (H t Ht) as [-> ->]. reflexivity.
Qed.

Lemma ls_opt_ext n a b a' b' :
  (forall t, (t < n)%nat -> a t = a' t /\ b t = b' t) ->
  ls_opt n a b = ls_opt n a' b'.
Proof.
  intros H. unfold ls_opt.
  rewrite (sumN_ext n (fun t => a t * b t) (fun t => a' t * b' t)),
          (sumN_ext n (fun t => b t ^ 2) (fun t => b' t ^ 2)); [reflexivity| |];
  intros t Ht; destruct (H t Ht) as [Ha Hb]; rewrite ?Ha, ?Hb; reflexivity.
Qed.

(* ------------------------------------------------------------------------- *)
(** * 3. Separability (f)                                                     *)
(* ------------------------------------------------------------------------- *)

(** A vector minimising every coordinate's objective minimises their sum. *)
Theorem separable_minimiser d (F : nat -> R -> R) (wstar : nat -> R) :
  (forall i, (i < d)%nat -> forall v, F i (wstar i) <= F i v) ->
  forall w : nat -> R,
    sumN d (fun i => F i (wstar i)) <= sumN d (fun i => F i (w i)).
Proof. intros H w. apply sumN_le. intros i Hi. apply H, Hi. Qed.

(** If moreover each coordinate's minimiser is unique, so is the vector's. *)
Theorem separable_unique d (F : nat -> R -> R) (wstar : nat -> R) :
  (forall i, (i < d)%nat -> forall v, F i (wstar i) <= F i v) ->
  (forall i, (i < d)%nat -> forall v, F i v = F i (wstar i) -> v = wstar i) ->
  forall w : nat -> R,
    sumN d (fun i => F i (w i)) = sumN d (fun i => F i (wstar i)) ->
    forall i, (i < d)%nat -> w i = wstar i.
Proof.
  intros Hmin Huniq w Heq i Hi. apply Huniq; [exact Hi|].
  assert (Z : forall j, (j < d)%nat -> F j (w j) - F j (wstar j) = 0).
  { apply (sumN_nonneg_eq0 d (fun j => F j (w j) - F j (wstar j))).
    - intros j Hj. specialize (Hmin j Hj (w j)). lra.
    - rewrite sumN_minus. lra. }
  specialize (Z i Hi). lra.
Qed.

(** Conversely, a minimiser of the sum minimises every coordinate
    (coordinates are free: change one, keep the others). *)
Lemma sumN_update d (F : nat -> R -> R) (w : nat -> R) k v :
  (k < d)%nat ->
  sumN d (fun j => F j (if Nat.eq_dec j k then v else w j)) =
  sumN d (fun j => F j (w j)) - F k (w k) + F k v.
Proof.
  induction d as [|d IH]; intros Hk; [lia|]. cbn [sumN].
  destruct (Nat.eq_dec d k) as [->|Hne].
  - rewrite (sumN_ext k (fun j => F j (if Nat.eq_dec j k then v else w j))
                       (fun j => F j (w j))); [ring|].
    intros j Hj. destruct (Nat.eq_dec j k); [lia|reflexivity].
  - rewrite IH by lia. ring.
Qed.

Theorem separable_minimiser_converse d (F : nat -> R -> R) (w : nat -> R) :
  (forall w' : nat -> R,
      sumN d (fun i => F i (w i)) <= sumN d (fun i => F i (w' i))) ->
  forall i, (i < d)%nat -> forall v, F i (w i) <= F i v.
Proof.
  intros Hmin i Hi v.
  specialize (Hmin (fun j => if Nat.eq_dec j i then v else w j)).
  cbv beta in Hmin. rewrite sumN_update in Hmin by exact Hi. lra.
Qed.

(* ------------------------------------------------------------------------- *)
(** * 4. LayerNorm, RMSNorm and the OPM objective                             *)
(* ------------------------------------------------------------------------- *)

Definition vmean (d : nat) (v : nat -> R) : R := sumN d v / INR d.
Definition vvar (d : nat) (v : nat -> R) : R :=
  vmean d (fun i => (v i - vmean d v) ^ 2).
(** s = sqrt(var + eps) and r = sqrt(mean(x^2) + eps). *)
Definition ln_s (d : nat) (eps : R) (v : nat -> R) : R := sqrt (vvar d v + eps).
Definition rms_r (d : nat) (eps : R) (v : nat -> R) : R :=
  sqrt (vmean d (fun i => v i ^ 2) + eps).

(** LayerNorm with weight g and bias b; RMSNorm with weight w. *)
Definition layernorm (d : nat) (eps : R) (g b v : nat -> R) (i : nat) : R :=
  g i * (v i - vmean d v) / ln_s d eps v + b i.
Definition rmsnorm (d : nat) (eps : R) (w v : nat -> R) (i : nat) : R :=
  w i * v i / rms_r d eps v.

(** L(w) = sum_t sum_i (y_ti - w_i x_ti / r_t)^2 over T tokens x t. *)
Definition opm_loss d T eps (g b : nat -> R) (x : nat -> nat -> R)
           (w : nat -> R) : R :=
  sumN T (fun t => sumN d (fun i =>
    (layernorm d eps g b (x t) i - rmsnorm d eps w (x t) i) ^ 2)).

(** The three running sums of the closed form. *)
Definition opm_S d T eps (x : nat -> nat -> R) (i : nat) : R :=
  sumN T (fun t => x t i ^ 2 / rms_r d eps (x t) ^ 2).
Definition opm_A d T eps (x : nat -> nat -> R) (i : nat) : R :=
  sumN T (fun t => (x t i - vmean d (x t)) * x t i
                   / (ln_s d eps (x t) * rms_r d eps (x t)))
  / opm_S d T eps x i.
Definition opm_B d T eps (x : nat -> nat -> R) (i : nat) : R :=
  sumN T (fun t => x t i / rms_r d eps (x t)) / opm_S d T eps x i.

(** The closed form  w*_i = g_i A_i + b_i B_i. *)
Definition opm_w d T eps (g b : nat -> R) (x : nat -> nat -> R) (i : nat) : R :=
  g i * opm_A d T eps x i + b i * opm_B d T eps x i.

(** Per-coordinate data of the one-dimensional problem:
    a_t = y_ti (LayerNorm output), b_t = x_ti / r_t. *)
Definition opm_a d eps (g b : nat -> R) (x : nat -> nat -> R) (i t : nat) : R :=
  layernorm d eps g b (x t) i.
Definition opm_b d eps (x : nat -> nat -> R) (i t : nat) : R :=
  x t i / rms_r d eps (x t).

(** Separability: L(w) = sum_i f_i(w_i). *)
Lemma opm_loss_separable d T eps g b x w :
  opm_loss d T eps g b x w =
  sumN d (fun i => ls_obj T (opm_a d eps g b x i) (opm_b d eps x i) (w i)).
Proof.
  unfold opm_loss. rewrite sumN_swap. apply sumN_ext. intros i Hi.
  unfold ls_obj. apply sumN_ext. intros t Ht.
  unfold opm_a, opm_b, rmsnorm. unfold Rdiv. ring.
Qed.

(** sum_t x_ti^2 / r_t^2 = sum_t (x_ti / r_t)^2 (no hypothesis needed). *)
Lemma opm_S_sumsq d T eps x i :
  opm_S d T eps x i = sumN T (fun t => opm_b d eps x i t ^ 2).
Proof.
  unfold opm_S. apply sumN_ext. intros t Ht. unfold opm_b, Rdiv.
  set (r := rms_r d eps (x t)).
  replace (r ^ 2) with (r * r) by ring. rewrite Rinv_mult. ring.
Qed.

Lemma opm_S_nonneg d T eps x i : 0 <= opm_S d T eps x i.
Proof. rewrite opm_S_sumsq. apply sumsq_nonneg. Qed.

(** The closed form is the one-dimensional least-squares optimum of each
    coordinate: w*_i = sum_t y_ti b_t / sum_t b_t^2 with b_t = x_ti / r_t. *)
Theorem opm_w_is_ls_opt d T eps g b x i :
  opm_w d T eps g b x i = ls_opt T (opm_a d eps g b x i) (opm_b d eps x i).
Proof.
  rewrite (ls_opt_linear T (opm_a d eps g b x i) (opm_b d eps x i)
             (fun t => (x t i - vmean d (x t)) / ln_s d eps (x t))
             (fun _ => 1) (g i) (b i)).
  2: { intros t Ht. unfold opm_a, layernorm. unfold Rdiv. ring. }
  unfold opm_w, opm_A, opm_B, ls_opt. rewrite <- opm_S_sumsq.
  f_equal; f_equal; f_equal; apply sumN_ext; intros t Ht; unfold opm_b, Rdiv.
  - rewrite Rinv_mult. ring.
  - ring.
Qed.

(** Linearity of w* in (g, b): A_i and B_i depend on the data x only. *)
Theorem opm_w_linear d T eps (g1 b1 g2 b2 : nat -> R) x (al be : R) i :
  opm_w d T eps (fun j => al * g1 j + be * g2 j) (fun j => al * b1 j + be * b2 j) x i =
  al * opm_w d T eps g1 b1 x i + be * opm_w d T eps g2 b2 x i.
Proof. unfold opm_w. ring. Qed.

(** Main theorem 1 (gap identity, exact, no hypothesis at all):
      L(w) - L(w* ) = sum_i (w_i - w*_i)^2 * sum_t x_ti^2 / r_t^2. *)
Theorem opm_gap d T eps g b x w :
  opm_loss d T eps g b x w - opm_loss d T eps g b x (opm_w d T eps g b x) =
  sumN d (fun i => (w i - opm_w d T eps g b x i) ^ 2 * opm_S d T eps x i).
Proof.
  rewrite !opm_loss_separable, <- sumN_minus. apply sumN_ext. intros i Hi.
  rewrite opm_w_is_ls_opt, opm_S_sumsq. apply ls_gap.
Qed.

(** Main theorem 2: the closed form is a global minimiser of L. *)
Theorem opm_w_minimises d T eps g b x w :
  opm_loss d T eps g b x (opm_w d T eps g b x) <= opm_loss d T eps g b x w.
Proof.
  pose proof (opm_gap d T eps g b x w) as G.
  assert (0 <= sumN d (fun i => (w i - opm_w d T eps g b x i) ^ 2
                                * opm_S d T eps x i)).
  { apply sumN_nonneg. intros i Hi.
    apply Rmult_le_pos; [apply pow2_ge_0|apply opm_S_nonneg]. }
  lra.
Qed.

(** Main theorem 3: uniqueness on the coordinates with S_i > 0. *)
Theorem opm_w_unique d T eps g b x w :
  (forall i, (i < d)%nat -> 0 < opm_S d T eps x i) ->
  opm_loss d T eps g b x w = opm_loss d T eps g b x (opm_w d T eps g b x) ->
  forall i, (i < d)%nat -> w i = opm_w d T eps g b x i.
Proof.
  intros Hpos Heq i Hi.
  pose proof (opm_gap d T eps g b x w) as G. rewrite Heq, Rminus_eq_0 in G.
  assert (Z := sumN_nonneg_eq0 d
                 (fun i => (w i - opm_w d T eps g b x i) ^ 2 * opm_S d T eps x i)).
  cbv beta in Z.
  assert (E : (w i - opm_w d T eps g b x i) ^ 2 * opm_S d T eps x i = 0).
  { apply Z; [|symmetry; exact G|exact Hi].
    intros j Hj. apply Rmult_le_pos; [apply pow2_ge_0|apply opm_S_nonneg]. }
  specialize (Hpos i Hi).
  apply Rmult_integral in E. destruct E as [E|E]; [|lra].
  assert (w i - opm_w d T eps g b x i = 0) by nra. lra.
Qed.

Theorem opm_minimiser_iff d T eps g b x w :
  (forall i, (i < d)%nat -> 0 < opm_S d T eps x i) ->
  ((forall v, opm_loss d T eps g b x w <= opm_loss d T eps g b x v) <->
   (forall i, (i < d)%nat -> w i = opm_w d T eps g b x i)).
Proof.
  intros Hpos. split.
  - intros Hmin. apply opm_w_unique; [exact Hpos|].
    apply Rle_antisym; [apply Hmin|apply opm_w_minimises].
  - intros Hw v.
    rewrite (opm_loss_separable d T eps g b x w),
            (sumN_ext d _ (fun i => ls_obj T (opm_a d eps g b x i)
                                        (opm_b d eps x i)
                                        (opm_w d T eps g b x i)))
      by (intros i Hi; rewrite Hw by exact Hi; reflexivity).
    rewrite <- opm_loss_separable. apply opm_w_minimises.
Qed.

(** A coordinate with S_i = 0 does not influence L: every w_i minimises. *)
Theorem opm_degenerate_coord d T eps g b x k (w v : nat -> R) :
  opm_S d T eps x k = 0 ->
  (forall j, j <> k -> w j = v j) ->
  opm_loss d T eps g b x w = opm_loss d T eps g b x v.
Proof.
  intros H0 Hwv. rewrite !opm_loss_separable. apply sumN_ext. intros j Hj.
  destruct (Nat.eq_dec j k) as [->|Hne].
  - apply ls_degenerate. rewrite <- opm_S_sumsq. exact H0.
  - rewrite Hwv by exact Hne. reflexivity.
Qed.

Lemma vmean_nonneg d v : (forall i, (i < d)%nat -> 0 <= v i) -> 0 <= vmean d v.
Proof.
  intros H. unfold vmean. destruct d as [|d].
  - cbn. unfold Rdiv. rewrite Rinv_0. lra.
  - apply Rmult_le_pos; [apply sumN_nonneg, H|].
    apply Rlt_le, Rinv_0_lt_compat, lt_0_INR. lia.
Qed.

Lemma rms_r_pos d eps v : 0 < eps -> 0 < rms_r d eps v.
Proof.
  intros He. unfold rms_r. apply sqrt_lt_R0.
  assert (0 <= vmean d (fun i => v i ^ 2))
    by (apply vmean_nonneg; intros; apply pow2_ge_0).
  lra.
Qed.

(** With eps > 0: S_i = 0 exactly when feature i is zero on every token. *)
Theorem opm_S_zero_iff d T eps x i :
  0 < eps ->
  (opm_S d T eps x i = 0 <-> forall t, (t < T)%nat -> x t i = 0).
Proof.
  intros He. rewrite opm_S_sumsq. split.
  - intros H t Ht. pose proof (sumsq_eq0 T (opm_b d eps x i) H t Ht) as E.
    unfold opm_b in E. pose proof (rms_r_pos d eps (x t) He) as Hr.
    unfold Rdiv in E. apply Rmult_integral in E. destruct E as [E|E]; [exact E|].
    exfalso. apply (Rinv_neq_0_compat (rms_r d eps (x t))); [lra|exact E].
  - intros H. rewrite (sumN_ext T _ (fun _ => 0)); [apply sumN_zero|].
    intros t Ht. unfold opm_b. rewrite H by exact Ht. unfold Rdiv. ring.
Qed.

(* ------------------------------------------------------------------------- *)
(** * 5. The zero-mean regime (g), the corollary, and the bias residual       *)
(* ------------------------------------------------------------------------- *)

Lemma vmean_ext d u v :
  (forall i, (i < d)%nat -> u i = v i) -> vmean d u = vmean d v.
Proof. intros H. unfold vmean. rewrite (sumN_ext d u v H). reflexivity. Qed.

Lemma sumN_sq_centre d v m :
  sumN d (fun i => (v i - m) ^ 2) =
  sumN d (fun i => v i ^ 2) - 2 * m * sumN d v + INR d * m ^ 2.
Proof. induction d as [|d IH]; cbn [sumN]; [cbn; ring|]. rewrite IH, S_INR. ring. Qed.

(** var = mean(x^2) - mean(x)^2 (needs d > 0). *)
Theorem vvar_identity d v :
  (0 < d)%nat -> vvar d v = vmean d (fun i => v i ^ 2) - vmean d v ^ 2.
Proof.
  intros Hd. assert (INR d <> 0) by (apply not_0_INR; lia).
  unfold vvar, vmean. rewrite sumN_sq_centre. field. exact H.
Qed.

Lemma vvar_nonneg d v : 0 <= vvar d v.
Proof. unfold vvar. apply vmean_nonneg. intros; apply pow2_ge_0. Qed.

(** (g) mean(x) = 0  ==>  s = r  (any d, any eps). *)
Theorem zero_mean_s_eq_r d eps v :
  vmean d v = 0 -> ln_s d eps v = rms_r d eps v.
Proof.
  intros H. unfold ln_s, rms_r, vvar. rewrite H.
  rewrite (vmean_ext d (fun i => (v i - 0) ^ 2) (fun i => v i ^ 2))
    by (intros; ring).
  reflexivity.
Qed.

(** ... and conversely: s^2 = r^2 - mu^2, so s = r iff mu = 0 (d > 0, eps >= 0). *)
Theorem s_eq_r_iff d eps v :
  (0 < d)%nat -> 0 <= eps ->
  (ln_s d eps v = rms_r d eps v <-> vmean d v = 0).
Proof.
  intros Hd He. split; [|apply zero_mean_s_eq_r].
  intros H. unfold ln_s, rms_r in H.
  pose proof (vvar_nonneg d v).
  apply sqrt_inj in H; [|lra|].
  - rewrite vvar_identity in H by exact Hd. nra.
  - assert (0 <= vmean d (fun i => v i ^ 2))
      by (apply vmean_nonneg; intros; apply pow2_ge_0). lra.
Qed.

(** Zero-mean corollary, part 1: every mu_t = 0  ==>  A_i = 1. *)
Theorem zero_mean_A_one d T eps x i :
  (forall t, (t < T)%nat -> vmean d (x t) = 0) ->
  opm_S d T eps x i <> 0 -> opm_A d T eps x i = 1.
Proof.
  intros Hmu HS. unfold opm_A.
  rewrite (sumN_ext T _ (fun t => x t i ^ 2 / rms_r d eps (x t) ^ 2)).
  - fold (opm_S d T eps x i). field. exact HS.
  - intros t Ht. rewrite (zero_mean_s_eq_r d eps (x t) (Hmu t Ht)), (Hmu t Ht).
    unfold Rdiv. set (r := rms_r d eps (x t)).
    replace (r ^ 2) with (r * r) by ring. ring.
Qed.

(** Every mu_t = 0  ==>  w*_i = g_i + b_i B_i. *)
Theorem zero_mean_w d T eps g b x i :
  (forall t, (t < T)%nat -> vmean d (x t) = 0) ->
  opm_S d T eps x i <> 0 -> opm_w d T eps g b x i = g i + b i * opm_B d T eps x i.
Proof.
  intros Hmu HS. unfold opm_w. rewrite zero_mean_A_one by assumption. ring.
Qed.

(** (d) for OPM: every mu_t = 0 and b_i = 0  ==>  w*_i = g_i (the paper's OPM). *)
Theorem zero_mean_zero_bias_w d T eps g b x i :
  (forall t, (t < T)%nat -> vmean d (x t) = 0) -> b i = 0 ->
  opm_S d T eps x i <> 0 -> opm_w d T eps g b x i = g i.
Proof.
  intros Hmu Hb HS. rewrite zero_mean_w by assumption. rewrite Hb. ring.
Qed.

(** ... and then w = g reproduces the LayerNorm exactly: L(g) = 0. *)
Theorem zero_mean_zero_bias_exact d T eps g b x :
  (forall t, (t < T)%nat -> vmean d (x t) = 0) ->
  (forall i, (i < d)%nat -> b i = 0) ->
  opm_loss d T eps g b x g = 0.
Proof.
  intros Hmu Hb. unfold opm_loss.
  rewrite (sumN_ext T _ (fun _ => 0)); [apply sumN_zero|]. intros t Ht.
  rewrite (sumN_ext d _ (fun _ => 0)); [apply sumN_zero|]. intros i Hi.
  unfold layernorm, rmsnorm.
  rewrite (zero_mean_s_eq_r d eps (x t) (Hmu t Ht)), (Hmu t Ht), (Hb i Hi).
  unfold Rdiv. ring.
Qed.

(** The bias residual b_i B_i vanishes iff b_i = 0 or sum_t x_ti / r_t = 0. *)
Theorem bias_residual_zero_iff d T eps b x i :
  opm_S d T eps x i <> 0 ->
  (b i * opm_B d T eps x i = 0 <->
   b i = 0 \/ sumN T (fun t => x t i / rms_r d eps (x t)) = 0).
Proof.
  intros HS. unfold opm_B.
  set (N := sumN T (fun t => x t i / rms_r d eps (x t))).
  set (S := opm_S d T eps x i) in *.
  split.
  - intros H. apply Rmult_integral in H. destruct H as [H|H]; [left; exact H|].
    right. replace N with (N / S * S) by (field; exact HS). rewrite H. ring.
  - intros [H|H]; rewrite H; unfold Rdiv; ring.
Qed.

(** Counterexample: every per-token mean is 0, yet w* <> g when b <> 0.
    One token (T = 1), two features (d = 2): x_0 = (1, -1).
    mu_0 = 0, r_0 = sqrt(1 + eps), B_0 = r_0, so w*_0 = g_0 + b_0 sqrt(1+eps). *)
Definition cex_x (t i : nat) : R :=
  match i with O => 1 | _ => -1 end.

Theorem counterexample_zero_mean_bias eps (g b : nat -> R) :
  0 <= eps ->
  vmean 2 (cex_x 0) = 0 /\
  opm_w 2 1 eps g b cex_x 0 = g 0%nat + b 0%nat * sqrt (1 + eps) /\
  (b 0%nat <> 0 -> opm_w 2 1 eps g b cex_x 0 <> g 0%nat).
Proof.
  intros He.
  assert (Hm : vmean 2 (cex_x 0) = 0).
  { unfold vmean, cex_x. cbn [sumN INR]. unfold Rdiv. ring. }
  assert (Hr : rms_r 2 eps (cex_x 0) = sqrt (1 + eps)).
  { unfold rms_r, vmean, cex_x. cbn [sumN INR]. f_equal. field. }
  assert (Hpos : 0 < sqrt (1 + eps)) by (apply sqrt_lt_R0; lra).
  assert (Hw : opm_w 2 1 eps g b cex_x 0 = g 0%nat + b 0%nat * sqrt (1 + eps)).
  { rewrite zero_mean_w.
    - unfold opm_B, opm_S. cbn [sumN]. rewrite Hr. unfold cex_x.
      field. lra.
    - intros t Ht. replace t with 0%nat by lia. exact Hm.
    - unfold opm_S. cbn [sumN]. rewrite Hr. unfold cex_x.
      apply Rgt_not_eq. apply Rlt_gt.
      replace (0 + 1 ^ 2 / sqrt (1 + eps) ^ 2) with (/ sqrt (1 + eps) ^ 2)
        by (field; lra).
      apply Rinv_0_lt_compat. apply pow_lt. exact Hpos. }
  split; [exact Hm|]. split; [exact Hw|].
  intros Hb. rewrite Hw. intros E.
  assert (b 0%nat * sqrt (1 + eps) = 0) by lra.
  apply Rmult_integral in H. lra.
Qed.

(* ------------------------------------------------------------------------- *)
(** * 6. Invariances: positive per-token scaling (eps = 0), permutations      *)
(* ------------------------------------------------------------------------- *)

(** The closed form depends on the data only through (a_t, b_t) per coordinate. *)
Lemma opm_w_data_ext d T eps g b x d' eps' g' b' x' i i' :
  (forall t, (t < T)%nat -> opm_a d eps g b x i t = opm_a d' eps' g' b' x' i' t
                          /\ opm_b d eps x i t = opm_b d' eps' x' i' t) ->
  opm_w d T eps g b x i = opm_w d' T eps' g' b' x' i'.
Proof.
  intros H. rewrite !opm_w_is_ls_opt. apply ls_opt_ext, H.
Qed.

Lemma vmean_scal d c v : vmean d (fun i => c * v i) = c * vmean d v.
Proof. unfold vmean. rewrite sumN_scal. unfold Rdiv. ring. Qed.

Lemma vvar_scal d c v : vvar d (fun i => c * v i) = c ^ 2 * vvar d v.
Proof.
  unfold vvar. rewrite (vmean_scal d c v).
  rewrite <- (vmean_scal d (c ^ 2) (fun i => (v i - vmean d v) ^ 2)).
  apply vmean_ext. intros; ring.
Qed.

Lemma ln_s_scal0 d c v : 0 <= c -> ln_s d 0 (fun i => c * v i) = c * ln_s d 0 v.
Proof.
  intros Hc. unfold ln_s. rewrite vvar_scal, !Rplus_0_r.
  rewrite sqrt_mult_alt by apply pow2_ge_0. rewrite sqrt_pow2 by exact Hc.
  reflexivity.
Qed.

Lemma rms_r_scal0 d c v : 0 <= c -> rms_r d 0 (fun i => c * v i) = c * rms_r d 0 v.
Proof.
  intros Hc. unfold rms_r. rewrite !Rplus_0_r.
  rewrite (vmean_ext d (fun i => (c * v i) ^ 2) (fun i => c ^ 2 * v i ^ 2))
    by (intros; ring).
  rewrite vmean_scal, sqrt_mult_alt by apply pow2_ge_0.
  rewrite sqrt_pow2 by exact Hc. reflexivity.
Qed.

(** With eps = 0, LayerNorm and x / r are invariant under x -> c x, c > 0. *)
Lemma layernorm_scale_inv0 d c g b v i :
  0 < c -> layernorm d 0 g b (fun j => c * v j) i = layernorm d 0 g b v i.
Proof.
  intros Hc. unfold layernorm. rewrite vmean_scal, ln_s_scal0 by lra.
  unfold Rdiv. rewrite Rinv_mult.
  replace (g i * (c * v i - c * vmean d v) * (/ c * / ln_s d 0 v))
    with (g i * (v i - vmean d v) * / ln_s d 0 v * (c * / c)) by ring.
  rewrite Rinv_r by lra. ring.
Qed.

Lemma rms_ratio_scale_inv0 d c v i :
  0 < c -> c * v i / rms_r d 0 (fun j => c * v j) = v i / rms_r d 0 v.
Proof.
  intros Hc. rewrite rms_r_scal0 by lra. unfold Rdiv. rewrite Rinv_mult.
  replace (c * v i * (/ c * / rms_r d 0 v)) with (v i * / rms_r d 0 v * (c * / c))
    by ring.
  rewrite Rinv_r by lra. ring.
Qed.

(** Invariance under positive per-token scaling when eps = 0:
    x'_t = c_t x_t with c_t > 0 gives the same w* and the same L. *)
Theorem opm_scale_invariant0 d T g b x (c : nat -> R) :
  (forall t, (t < T)%nat -> 0 < c t) ->
  let x' := fun t i => c t * x t i in
  (forall i, opm_w d T 0 g b x' i = opm_w d T 0 g b x i) /\
  (forall w, opm_loss d T 0 g b x' w = opm_loss d T 0 g b x w).
Proof.
  intros Hc x'.
  assert (Hab : forall i t, (t < T)%nat ->
             opm_a d 0 g b x' i t = opm_a d 0 g b x i t /\
             opm_b d 0 x' i t = opm_b d 0 x i t).
  { intros i t Ht. unfold opm_a, opm_b, x'. split.
    - apply layernorm_scale_inv0, Hc, Ht.
    - apply rms_ratio_scale_inv0, Hc, Ht. }
  split.
  - intros i. apply opm_w_data_ext. intros t Ht. apply Hab, Ht.
  - intros w. rewrite !opm_loss_separable. apply sumN_ext. intros i Hi.
    apply ls_obj_ext. intros t Ht. apply Hab, Ht.
Qed.

(** Permuting the features by p (a permutation of {0..d-1}). *)
Section FeaturePermutation.
  Variable d : nat.
  Variable p : nat -> nat.
  Hypothesis Hp : Permutation (map p (seq 0 d)) (seq 0 d).

  Lemma vmean_perm v : vmean d (fun i => v (p i)) = vmean d v.
  Proof. unfold vmean. rewrite (sumN_perm d p v Hp). reflexivity. Qed.

  Lemma vvar_perm v : vvar d (fun i => v (p i)) = vvar d v.
  Proof.
    unfold vvar. rewrite vmean_perm.
    apply (vmean_perm (fun j => (v j - vmean d v) ^ 2)).
  Qed.

  Lemma ln_s_perm eps v : ln_s d eps (fun i => v (p i)) = ln_s d eps v.
  Proof. unfold ln_s. rewrite vvar_perm. reflexivity. Qed.

  Lemma rms_r_perm eps v : rms_r d eps (fun i => v (p i)) = rms_r d eps v.
  Proof.
    unfold rms_r. rewrite (vmean_perm (fun j => v j ^ 2)). reflexivity.
  Qed.

  Lemma layernorm_perm eps g b v i :
    layernorm d eps (fun j => g (p j)) (fun j => b (p j)) (fun j => v (p j)) i =
    layernorm d eps g b v (p i).
  Proof. unfold layernorm. rewrite vmean_perm, ln_s_perm. reflexivity. Qed.

  Lemma rmsnorm_perm eps w v i :
    rmsnorm d eps (fun j => w (p j)) (fun j => v (p j)) i = rmsnorm d eps w v (p i).
  Proof. unfold rmsnorm. rewrite rms_r_perm. reflexivity. Qed.

  (** Permutation equivariance: permuting the features of the data and of
      (g, b) permutes w* the same way, and L(w o p) is unchanged. *)
  Theorem opm_feature_perm_equivariant T eps g b (x : nat -> nat -> R) :
    let x' := fun t i => x t (p i) in
    let g' := fun i => g (p i) in
    let b' := fun i => b (p i) in
    (forall i, opm_w d T eps g' b' x' i = opm_w d T eps g b x (p i)) /\
    (forall w, opm_loss d T eps g' b' x' (fun i => w (p i)) =
               opm_loss d T eps g b x w).
  Proof.
    intros x' g' b'. split.
    - intros i. apply opm_w_data_ext. intros t Ht.
      unfold opm_a, opm_b, x', g', b'. split.
      + apply layernorm_perm.
      + rewrite rms_r_perm. reflexivity.
    - intros w. unfold opm_loss. apply sumN_ext. intros t Ht.
      unfold x', g', b'.
      rewrite (sumN_ext d _ (fun i => (layernorm d eps g b (x t) (p i)
                                       - rmsnorm d eps w (x t) (p i)) ^ 2)).
      + apply (sumN_perm d p (fun j => (layernorm d eps g b (x t) j
                                        - rmsnorm d eps w (x t) j) ^ 2) Hp).
      + intros i Hi. rewrite layernorm_perm, rmsnorm_perm. reflexivity.
  Qed.
End FeaturePermutation.

(** Permuting the calibration tokens by q changes neither w* nor L. *)
Theorem opm_token_perm_invariant d T eps g b (x : nat -> nat -> R) (q : nat -> nat) :
  Permutation (map q (seq 0 T)) (seq 0 T) ->
  let x' := fun t => x (q t) in
  (forall i, opm_w d T eps g b x' i = opm_w d T eps g b x i) /\
  (forall w, opm_loss d T eps g b x' w = opm_loss d T eps g b x w).
Proof.
  intros Hq x'. split.
  - intros i. unfold opm_w, opm_A, opm_B, opm_S, x'.
    rewrite (sumN_perm T q (fun t => x t i ^ 2 / rms_r d eps (x t) ^ 2) Hq),
            (sumN_perm T q (fun t => x t i / rms_r d eps (x t)) Hq),
            (sumN_perm T q (fun t => (x t i - vmean d (x t)) * x t i
                                     / (ln_s d eps (x t) * rms_r d eps (x t))) Hq).
    reflexivity.
  - intros w. unfold opm_loss, x'.
    apply (sumN_perm T q (fun t => sumN d (fun i =>
             (layernorm d eps g b (x t) i - rmsnorm d eps w (x t) i) ^ 2)) Hq).
Qed.

(* ------------------------------------------------------------------------- *)
(** * 7. The exact centred conversion (notes section 3)                       *)
(* ------------------------------------------------------------------------- *)

Definition centre (d : nat) (v : nat -> R) : nat -> R := fun i => v i - vmean d v.

Lemma vmean_plus d u v : vmean d (fun i => u i + v i) = vmean d u + vmean d v.
Proof. unfold vmean. rewrite sumN_plus. unfold Rdiv. ring. Qed.

Lemma centre_mean d v : (0 < d)%nat -> vmean d (centre d v) = 0.
Proof.
  intros Hd. assert (INR d <> 0) by (apply not_0_INR; lia).
  unfold centre, vmean. rewrite sumN_minus, sumN_const. field. exact H.
Qed.

Lemma centre_var d v : (0 < d)%nat -> vvar d (centre d v) = vvar d v.
Proof.
  intros Hd. unfold vvar at 1. rewrite centre_mean by exact Hd.
  unfold vvar. apply vmean_ext. intros i Hi. unfold centre. ring.
Qed.

(** LayerNorm(h) = LayerNorm(h - mean(h)). *)
Theorem layernorm_centre d eps g b v i :
  (0 < d)%nat -> layernorm d eps g b (centre d v) i = layernorm d eps g b v i.
Proof.
  intros Hd. unfold layernorm, ln_s.
  rewrite centre_var, centre_mean by exact Hd. unfold centre, Rdiv. ring.
Qed.

(** If mean(h) = 0, LayerNorm with (g, b) = RMSNorm with w = g, plus b,
    with the same eps. *)
Theorem layernorm_zero_mean_rmsnorm d eps g b v i :
  vmean d v = 0 -> layernorm d eps g b v i = rmsnorm d eps g v i + b i.
Proof.
  intros H. unfold layernorm, rmsnorm.
  rewrite (zero_mean_s_eq_r d eps v H), H. unfold Rdiv. ring.
Qed.

Theorem layernorm_as_centred_rmsnorm d eps g b v i :
  (0 < d)%nat -> layernorm d eps g b v i = rmsnorm d eps g (centre d v) i + b i.
Proof.
  intros Hd. rewrite <- (layernorm_centre d eps g b v i Hd).
  apply layernorm_zero_mean_rmsnorm, centre_mean, Hd.
Qed.

(** A linear map with m inputs: (W z)_i = sum_j W_ij z_j. *)
Definition lin (m : nat) (W : nat -> nat -> R) (z : nat -> R) (i : nat) : R :=
  sumN m (fun j => W i j * z j).

(** Folding a bias into the next linear layer: W (z + b) = W z + W b. *)
Theorem lin_bias_fold m W z b i :
  lin m W (fun j => z j + b j) i = lin m W z i + lin m W b i.
Proof.
  unfold lin. rewrite <- sumN_plus. apply sumN_ext. intros; ring.
Qed.

(** Centring the output rows of a linear layer (W'_ij = W_ij - mean_k W_kj)
    centres its output: W' z = centre (W z). *)
Definition centre_rows (d : nat) (W : nat -> nat -> R) : nat -> nat -> R :=
  fun i j => W i j - vmean d (fun k => W k j).

Theorem lin_centre_rows d m W z i :
  lin m (centre_rows d W) z i = centre d (lin m W z) i.
Proof.
  unfold lin, centre_rows, centre.
  rewrite (sumN_ext m _ (fun j => W i j * z j - / INR d * (sumN d (fun k => W k j) * z j)))
    by (intros; unfold vmean, Rdiv; ring).
  rewrite sumN_minus, sumN_scal. f_equal.
  unfold vmean. rewrite sumN_swap.
  rewrite (sumN_ext m (fun j => sumN d (fun k => W k j * z j))
                      (fun j => sumN d (fun k => W k j) * z j))
    by (intros; apply sumN_scal_r).
  unfold Rdiv. ring.
Qed.

Lemma centre_plus d u v i :
  centre d (fun j => u j + v j) i = centre d u i + centre d v i.
Proof. unfold centre. rewrite vmean_plus. ring. Qed.

(** "Agree on the first d coordinates" is all the norms look at. *)
Definition eqd (d : nat) (u v : nat -> R) : Prop := forall i, (i < d)%nat -> u i = v i.

Lemma centre_ext d u v : eqd d u v -> eqd d (centre d u) (centre d v).
Proof. intros H i Hi. unfold centre. rewrite (vmean_ext d u v H), H by exact Hi. reflexivity. Qed.

Lemma layernorm_ext d eps g b u v : eqd d u v ->
  eqd d (layernorm d eps g b u) (layernorm d eps g b v).
Proof.
  intros H i Hi. unfold layernorm, ln_s, vvar.
  rewrite (vmean_ext d u v H), H by exact Hi.
  rewrite (vmean_ext d (fun j => (u j - vmean d v) ^ 2) (fun j => (v j - vmean d v) ^ 2))
    by (intros j Hj; rewrite H by exact Hj; reflexivity).
  reflexivity.
Qed.

Lemma rmsnorm_ext d eps w u v : eqd d u v -> eqd d (rmsnorm d eps w u) (rmsnorm d eps w v).
Proof.
  intros H i Hi. unfold rmsnorm, rms_r.
  rewrite (vmean_ext d (fun j => u j ^ 2) (fun j => v j ^ 2))
    by (intros j Hj; rewrite H by exact Hj; reflexivity).
  rewrite H by exact Hi. reflexivity.
Qed.

(** The whole pre-norm residual stack, abstractly, over a sequence.
    The stream is H : nat -> nat -> R, "H p i" = feature i at position p.
    Sublayer k normalises every position with its norm (g k, b k) and writes
    F k (normalised sequence); F k is an arbitrary function of the whole
    sequence (causal attention + o_proj, or the position-wise SwiGLU MLP)
    that only reads features < d ([F_local]).
      source:     H_{k+1} = H_k + F_k(LayerNorm_{g_k,b_k}(H_k)),    H_0 = E
      converted:  H'_{k+1} = H'_k + centre(F_k(RMSNorm_{g_k}(H'_k) + b_k)),
                  H'_0 = centre(E)
    (norms and centre act position by position).  "F_k(z + b_k)" is F_k with
    b_k folded into its first linear layers ([lin_bias_fold]);
    "centre(F_k(..))" is F_k with its last linear layer's output rows centred
    ([lin_centre_rows]); centre(E) = centred embedding rows.
    Claim: H'_k = centre(H_k) at every position, for every k
    ([centred_stream]), and final LayerNorm = RMSNorm(H'_L) + b_final, so the
    logits differ by exactly W_lm b_final ([centred_logits]). *)
Section CentredNetwork.
  Variable d : nat.
  Hypothesis Hd : (0 < d)%nat.
  Variable eps : R.
  Variables g b : nat -> nat -> R.
  Variable F : nat -> (nat -> nat -> R) -> (nat -> nat -> R).
  Hypothesis F_local : forall k U V,
    (forall p, eqd d (U p) (V p)) -> forall p, eqd d (F k U p) (F k V p).
  Variable E : nat -> nat -> R.

  Fixpoint src (k : nat) : nat -> nat -> R :=
    match k with
    | O => E
    | S k => fun p i =>
        src k p i + F k (fun q => layernorm d eps (g k) (b k) (src k q)) p i
    end.

  Fixpoint dst (k : nat) : nat -> nat -> R :=
    match k with
    | O => fun p => centre d (E p)
    | S k => fun p i =>
        dst k p i
        + centre d (F k (fun q j => rmsnorm d eps (g k) (dst k q) j + b k j) p) i
    end.

  Lemma dst_mean0 k (IH : forall p, eqd d (dst k p) (centre d (src k p))) p :
    vmean d (dst k p) = 0.
  Proof.
    rewrite (vmean_ext d (dst k p) (centre d (src k p)) (IH p)).
    apply centre_mean, Hd.
  Qed.

  Theorem centred_stream k : forall p, eqd d (dst k p) (centre d (src k p)).
  Proof.
    induction k as [|k IH]; intros p i Hi; [reflexivity|].
    cbn [dst src]. rewrite centre_plus.
    assert (Hin : forall q, eqd d (fun j => rmsnorm d eps (g k) (dst k q) j + b k j)
                                  (layernorm d eps (g k) (b k) (src k q))).
    { intros q j Hj.
      rewrite <- (layernorm_zero_mean_rmsnorm d eps (g k) (b k) (dst k q) j
                    (dst_mean0 k IH q)).
      rewrite (layernorm_ext d eps (g k) (b k) (dst k q) (centre d (src k q))
                 (IH q) j Hj).
      apply layernorm_centre, Hd. }
    rewrite (IH p i Hi).
    rewrite (centre_ext d _ _ (F_local k _ _ Hin p) i Hi). reflexivity.
  Qed.

  (** Final norm + LM head, at every position p:
        logits_src = logits_dst + W_lm b_final, exactly. *)
  Theorem centred_logits L (Wlm : nat -> nat -> R) (gf bf : nat -> R) p i :
    lin d Wlm (layernorm d eps gf bf (src L p)) i =
    lin d Wlm (rmsnorm d eps gf (dst L p)) i + lin d Wlm bf i.
  Proof.
    rewrite <- lin_bias_fold. unfold lin. apply sumN_ext. intros j Hj.
    f_equal.
    rewrite <- (layernorm_zero_mean_rmsnorm d eps gf bf (dst L p) j
                  (dst_mean0 L (centred_stream L) p)).
    rewrite (layernorm_ext d eps gf bf (dst L p) (centre d (src L p))
               (centred_stream L p) j Hj).
    symmetry. apply layernorm_centre, Hd.
  Qed.
End CentredNetwork.

(* ------------------------------------------------------------------------- *)
(** * 8. What the results rest on                                           *)
(* ------------------------------------------------------------------------- *)

(** All the main results in one term, so that a single [Print Assumptions]
    covers them (each [Print Assumptions] costs about a second). *)
Definition opm_main_results :=
  (ls_gap, ls_opt_minimises, ls_opt_unique, ls_minimiser_iff, ls_degenerate,
   ls_normal_equation, ls_opt_exact, ls_exact_fit_zero, ls_opt_linear,
   separable_minimiser, separable_unique, separable_minimiser_converse,
   (opm_loss_separable, opm_w_is_ls_opt, opm_w_linear, opm_gap, opm_w_minimises,
    opm_w_unique, opm_minimiser_iff, opm_degenerate_coord, opm_S_zero_iff),
   (vvar_identity, zero_mean_s_eq_r, s_eq_r_iff, zero_mean_A_one,
    zero_mean_w, zero_mean_zero_bias_w, zero_mean_zero_bias_exact,
    bias_residual_zero_iff, counterexample_zero_mean_bias),
   (opm_scale_invariant0, opm_feature_perm_equivariant,
    opm_token_perm_invariant, sumN_perm),
   (layernorm_centre, layernorm_zero_mean_rmsnorm,
    layernorm_as_centred_rmsnorm, lin_bias_fold, lin_centre_rows,
    centred_stream, centred_logits)).

(** Expected output (Coq 8.16.1): exactly the three axioms on which the
    standard library's real numbers are built (Print Assumptions sqrt_pos
    prints the same list; Rplus_comm already needs the last two); nothing
    else.
      Axioms:
      ClassicalDedekindReals.sig_not_dec : forall P : Prop, {~ ~ P} + {~ P}
      ClassicalDedekindReals.sig_forall_dec : forall P : nat -> Prop, ...
      FunctionalExtensionality.functional_extensionality_dep : ...        *)
Print Assumptions opm_main_results.
