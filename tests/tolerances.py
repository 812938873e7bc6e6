"""Float tolerances of the suite, each derived from what differs between the two sides it compares.

A test must pass on any x86 CPU (Intel or AMD, whatever BLAS kernels torch picks there) with any thread
count, and still fail when the behaviour it names breaks. The numbers below are the floor the arithmetic
allows; the bugs the tests guard move the compared values far more:

- one token too many or too few in a sum of N per-token NLLs moves the total by about 1/N (the test
  splits here hold 100 to 10,000 tokens: 1e-4 to 1e-2 relative);
- a mean of per-block means instead of a token-weighted mean differs by the spread of block losses,
  typically 1e-3 relative or more;
- the (T - 1) / T loss scaling that transformers 5 applies to GPT-2 is 1/T relative (1.6e-2 at T = 64).

Where nothing differs (the same weights, the same tokens in the same batches, the same process and thread
count), the float operations are the same ones in the same order and the results are compared exactly.
"""

FLOAT32_EPS = 2.0**-23
"""Spacing of float32 numbers at 1 (1.19e-7); unit roundoff is half of it."""

FORWARD_RTOL = 1e-5
"""Two float32 forward passes of one model over the same tokens that may round differently: the rows sit
in batches of another shape (a CPU BLAS then blocks and orders its sums differently), or one side computes
full logits and a float64 log-softmax where the other keeps only the scored positions in float32. Each dot
product (inner dimension n <= 512 in the test models) carries a rounding error of order sqrt(n) * u
(about 1.4e-6 relative) that does not accumulate in sign across tokens; per-token NLLs are summed in
float64, and a sum of positive terms keeps the relative bound of its terms. 1e-5 leaves a margin of about
7x over that and is still 10x below the smallest bug above (one token in 10,000)."""

TRAINED_STEPS_RTOL = 1e-4
"""Losses after a few optimizer steps that ran with different (but equally valid) float32 kernels, such as
torch.compile's fused graphs against eager ones: each step differs by O(FORWARD_RTOL) and the difference
feeds into the next step's weights, growing at most linearly over the handful of steps the tests take
(6 to 12): below 1e-4, still 100x below a wrong loss (a dropped token, a wrong label shift)."""

FLOAT64_SUM_RTOL = 1e-9
"""A float64 sum of N = 10**6 positive per-token NLLs: even summed one by one its relative error is at most
N * 2**-53 = 1.1e-10 (torch sums pairwise, far less). A float32 total of 10**6 NLLs near 5e6 nats can't even be
held to better than 2**-24 = 6e-8 relative, and a float32 running sum drifts by far more: 1e-9 sits 9x above
the float64 worst case and 60x below float32's representation step."""
