# The study's patch shapes (sourced by the study scripts): squares 1x1 ... 10x10 and the
# equal-area aspect series 1x24 ... 24x1.
GRID=1x1,2x2,3x3,4x4,5x5,6x6,7x7,8x8,9x9,10x10,1x24,2x12,3x8,4x6,6x4,8x3,12x2,24x1
