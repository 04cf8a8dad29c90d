"""What a wrong answer costs, as the contract weighs it: training picks its threshold by these,
and the load test's detection score counts errors by them.

>>> FN_WEIGHT * 1 + FP_WEIGHT * 2
5
"""

FP_WEIGHT, FN_WEIGHT, HTTP_ERROR_WEIGHT = 1, 3, 5
"""A missed fraud costs three false alarms; a request with no usable answer costs five."""
