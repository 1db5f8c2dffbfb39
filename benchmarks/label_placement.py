"""Labels for the points of a scatter chart that overlap neither each other nor the points (nor, where room
allows, other marks such as error bars), each joined to its point by a leader line when it sits away from it;
points drawn on top of each other share one label."""
import math
from typing import List, Optional, Sequence, Tuple

from matplotlib.path import Path
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox

RADII = (6, 12, 20, 30, 42, 56, 72, 90, 110, 135, 160)  # pixels from the point, tried in turn
ANGLES = (0, 180, 25, -25, 155, -155, 50, -50, 130, -130, 90, -90)  # degrees, tried in turn at each radius
MARKER = 4  # pixels: half the side of the box a point occupies
TOGETHER = 9  # pixels: points closer than this (in a chain) are one spot with one label, their names joined
LEADER = 8  # pixels: a label farther from its point than this gets a leader line


def _box_at(x: float, y: float, width: float, height: float, radius: float, angle: float) -> Bbox:
    """The label's box `radius` pixels from (x, y) in direction `angle`, its near side facing the point."""
    dx, dy = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    cx = x + radius * dx + (width / 2 if dx > 0.3 else -width / 2 if dx < -0.3 else 0)
    cy = y + radius * dy + (height / 2 if dy > 0.3 else -height / 2 if dy < -0.3 else 0)
    return Bbox.from_extents(cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)


def _spots_together(pixels: Sequence[Tuple[float, float]]) -> List[List[int]]:
    """The points as groups: a point joins a group when it lies within TOGETHER pixels of one of its points."""
    groups: List[List[int]] = []
    for i, p in enumerate(pixels):
        near = [g for g in groups if any(math.dist(p, pixels[j]) < TOGETHER for j in g)]
        for g in near:
            groups.remove(g)
        groups.append(sorted([i] + [j for g in near for j in g]))
    return sorted(groups)


def _inside(box: Bbox, frame: Bbox) -> bool:
    return frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def _crosses(segment: Optional[Path], boxes: Sequence[Bbox]) -> bool:
    return segment is not None and any(segment.intersects_bbox(box) for box in boxes)


def place_labels(ax, points: Sequence[Tuple[float, float]], labels: Sequence[str], marks: Sequence[Bbox] = (),
                 **text_kwargs) -> List[Annotation]:
    """Annotate the data points with their labels, each at the first free spot on rings of growing radius around
    its point; points drawn on top of each other get one label, their names joined by commas, at their centre.

    Labels are placed in order of crowding (the spot with the most points near it first). A spot is free when the
    label's box lies inside the axes and overlaps no placed label and no point, its leader line crosses no placed
    label and no other point, no placed leader crosses it, and it keeps clear of the boxes of `marks` (display
    coordinates). Where no spot is free, the marks are given up first, then the leader crossings. The axes' limits
    must be final: placement is in pixels of the figure as drawn. Returns the annotations, one per group.
    """
    figure = ax.figure
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pixels = [tuple(ax.transData.transform(point)) for point in points]
    dots = [Bbox.from_extents(x - MARKER, y - MARKER, x + MARKER, y + MARKER) for x, y in pixels]
    groups = _spots_together(pixels)
    centres = [tuple(sum(pixels[i][k] for i in g) / len(g) for k in (0, 1)) for g in groups]
    texts = [', '.join(labels[i] for i in g) for g in groups]
    sizes = []
    for text in texts:
        probe = ax.text(0, 0, text, **text_kwargs)
        extent = probe.get_window_extent(renderer)
        sizes.append((extent.width + 2, extent.height))
        probe.remove()
    crowding = [sum(math.dist(c, p) < 60 for p in pixels) for c in centres]
    to_data = ax.transData.inverted().transform
    placed: List[Bbox] = []
    leaders: List[Path] = []
    annotations = []
    for k in sorted(range(len(groups)), key=lambda k: -crowding[k]):
        (x, y), (width, height) = centres[k], sizes[k]
        others = [dot for i, dot in enumerate(dots) if i not in groups[k]]
        spots = []
        for radius in RADII:
            for angle in ANGLES:
                box = _box_at(x, y, width, height, radius, angle)
                leader = Path([(x, y), ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)]) if radius > LEADER else None
                spots.append((radius, box, leader))
        fits = [lambda box, leader: _inside(box, frame) and not any(box.overlaps(b) for b in placed + dots),
                lambda box, leader: not _crosses(leader, placed + others)
                and not any(other.intersects_bbox(box) for other in leaders),
                lambda box, leader: not any(box.overlaps(b) for b in marks)]
        radius, box, leader = next((spot for level in (3, 2, 1) for spot in spots
                                    if all(fit(*spot[1:]) for fit in fits[:level])), spots[-1])
        placed.append(box)
        if leader is not None:
            leaders.append(leader)
        points_per_pixel = 72 / figure.dpi
        offset = ((box.x0 + box.x1) / 2 - x) * points_per_pixel, ((box.y0 + box.y1) / 2 - y) * points_per_pixel
        line = dict(arrowstyle='-', color='0.3', lw=0.8, shrinkA=1, shrinkB=MARKER) if leader is not None else None
        annotations.append(ax.annotate(texts[k], tuple(to_data((x, y))), xytext=offset, textcoords='offset points',
                                       ha='center', va='center', arrowprops=line, **text_kwargs))
    return annotations
