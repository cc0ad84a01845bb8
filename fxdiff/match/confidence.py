"""Named confidence levels of the matcher's pairs, strongest first.

The judge reads only ``WEAK``: a pair below it rests on order or sizes alone and is dropped when its
values disagree although everything upstream agrees.
"""

CERTAIN = 1.0           # identical inputs, unique parameter content, or the user's map
PATIENCE = (1.0, 0.95, 0.9, 0.85, 0.8)  # patience alignment, by feature level (0 strictest)
GRAPH_OUTPUT = 0.9      # graph outputs at the same position, same op and size
CONSUMED_BY_PAIR = 0.9  # a parameter of equal content consumed by a matched op pair
VOUCHES = 0.85          # a pair at least this sure vouches for its sole unmatched input
SOLE_INPUT = 0.8        # the most a sole unmatched input of a matched pair gets
STEP_BACK = 0.1         # what a sole unmatched input loses against the pair that vouches for it
WEAK = 0.75             # threshold: pairs below it rest on order or sizes alone
OTHER_USERS = 0.7       # the most a patience pair gets when its users are other ops
USER_OF_PAIR = 0.7      # a user of a matched pair with the same key and size, singled out
ORDER_OF_USE = 0.7      # the most a parameter of ambiguous content paired in order of first use gets
SIZE_ONLY = 0.6         # same shape alone: inputs of a matched pair, graph inputs, look-alike ops
CROSSED = 0.6           # the most a pair gets whose inputs are matched, each to none of the other's
