# The install test (registered by tests/install.cmake): installs the current
# build into a fresh prefix, then builds the consumer program against it
#   1. as a CMake package: find_package(plasa CONFIG REQUIRED), plasa::plasa
#      and plasa::plasa_static;
#   2. with pkg-config: cc $(pkg-config --cflags --libs plasa), shared;
#   3. with pkg-config --static --libs plasa-static: libplasa.a, although
#      libplasa.so is installed beside it;
# and runs every binary; each computes a tiny matmul + backward and checks it.
# ldd shows that the shared consumers load the installed libplasa.so and the
# static ones no libplasa.so at all. With -DTRAIN=ON the build has plasa-train:
# it must be installed in bin/ and run (--help) from there. With -DMPIRUN=...
# the build has plasa_mpi: consumer_mpi.c is built with pkg-config plasa-mpi
# and run on 2 ranks.
# cmake -DBUILD_DIR=... -DSRC_DIR=... -DWORK_DIR=... -DLIBDIR=... -DC_COMPILER=...
#       [-DC_FLAGS="..."] -DPKG_CONFIG=... -DLDD=... [-DTRAIN=ON] -P run.cmake
cmake_minimum_required(VERSION 3.18)
foreach(v BUILD_DIR SRC_DIR WORK_DIR LIBDIR C_COMPILER PKG_CONFIG LDD)
  if(NOT DEFINED ${v} OR "${${v}}" STREQUAL "")
    message(FATAL_ERROR "run.cmake: -D${v}=... is required")
  endif()
endforeach()
separate_arguments(c_flags UNIX_COMMAND "${C_FLAGS}")
set(prefix ${WORK_DIR}/prefix)
set(libdir ${prefix}/${LIBDIR})
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR}/src)

# run(<what> <command...>): fails the test with the output if the command does.
function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "${what} failed (${rc}): ${cmd}\n${out}\n${err}")
  endif()
  string(STRIP "${out}" out)
  set(run_out "${out}" PARENT_SCOPE)
endfunction()

function(check_consumer what)
  run("${what}" ${ARGN})
  if(NOT run_out MATCHES "^consumer: libplasa [0-9.]+ loss -4 grad 1 1 -1 -1: ok$")
    message(FATAL_ERROR "${what}: unexpected output: ${run_out}")
  endif()
  message(STATUS "${what}: ${run_out}")
endfunction()

# check_links(<what> <binary> SHARED|STATIC): what ldd says about libplasa.so.
function(check_links what bin kind)
  run("ldd ${what}" ${LDD} ${bin})
  string(REGEX MATCH "libplasa\\.so[^\n]*" line "${run_out}")
  if(kind STREQUAL "STATIC" AND line)
    message(FATAL_ERROR "${what} should not need libplasa.so, but ldd says: ${line}")
  endif()
  string(FIND "${line}" "=> ${libdir}/libplasa.so" at)
  if(kind STREQUAL "SHARED" AND at EQUAL -1)
    message(FATAL_ERROR "${what} should load ${libdir}/libplasa.so, ldd says:\n${run_out}")
  endif()
  if(NOT line)
    set(line "no libplasa.so")
  endif()
  message(STATUS "${what}: ldd: ${line}")
endfunction()

run("cmake --install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})
foreach(f include/plasa.h ${LIBDIR}/libplasa.a ${LIBDIR}/pkgconfig/plasa.pc
          ${LIBDIR}/pkgconfig/plasa-static.pc ${LIBDIR}/cmake/plasa/plasaConfig.cmake)
  if(NOT EXISTS ${prefix}/${f})
    message(FATAL_ERROR "not installed: ${f}")
  endif()
endforeach()
# plasa-generate (examples/plasa-generate) when the examples are built
if(EXISTS ${BUILD_DIR}/examples/plasa-generate/plasa-generate)
  if(NOT EXISTS ${prefix}/bin/plasa-generate)
    message(FATAL_ERROR "not installed: bin/plasa-generate")
  endif()
  run("plasa-generate --help" ${prefix}/bin/plasa-generate --help)
  if(NOT run_out MATCHES "^usage: plasa-generate CHECKPOINT")
    message(FATAL_ERROR "installed plasa-generate --help: ${run_out}")
  endif()
endif()
file(GLOB so ${libdir}/libplasa.so*)
if(NOT so)
  message(FATAL_ERROR "not installed: ${LIBDIR}/libplasa.so")
endif()
configure_file(${SRC_DIR}/CMakeLists.txt.in ${WORK_DIR}/src/CMakeLists.txt COPYONLY)
configure_file(${SRC_DIR}/consumer.c ${WORK_DIR}/src/consumer.c COPYONLY)

# 1. CMake package
run("configure the consumer" ${CMAKE_COMMAND} -S ${WORK_DIR}/src -B ${WORK_DIR}/cmake-build
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_C_COMPILER=${C_COMPILER}
    "-DCMAKE_C_FLAGS=${C_FLAGS}" "-DCMAKE_EXE_LINKER_FLAGS=${C_FLAGS}")
file(STRINGS ${WORK_DIR}/cmake-build/CMakeCache.txt found REGEX "^plasa_DIR:")
if(NOT found STREQUAL "plasa_DIR:PATH=${libdir}/cmake/plasa")
  message(FATAL_ERROR "find_package(plasa) found the wrong package: ${found}")
endif()
run("build the consumer" ${CMAKE_COMMAND} --build ${WORK_DIR}/cmake-build)
check_consumer("find_package, plasa::plasa" ${WORK_DIR}/cmake-build/consumer_shared)
check_links("find_package, plasa::plasa" ${WORK_DIR}/cmake-build/consumer_shared SHARED)
check_consumer("find_package, plasa::plasa_static" ${WORK_DIR}/cmake-build/consumer_static)
check_links("find_package, plasa::plasa_static" ${WORK_DIR}/cmake-build/consumer_static STATIC)

# 2. pkg-config, shared library
set(ENV{PKG_CONFIG_PATH} ${libdir}/pkgconfig)
run("pkg-config --cflags --libs plasa" ${PKG_CONFIG} --cflags --libs plasa)
separate_arguments(pc UNIX_COMMAND "${run_out}")
if(NOT "-I${prefix}/include" IN_LIST pc OR NOT "-L${libdir}" IN_LIST pc)
  message(FATAL_ERROR "plasa.pc does not point into the prefix: ${run_out}")
endif()
run("cc with pkg-config" ${C_COMPILER} ${c_flags} ${WORK_DIR}/src/consumer.c
    -o ${WORK_DIR}/consumer_pc ${pc} -lm)
set(keep_ld "$ENV{LD_LIBRARY_PATH}")
set(ENV{LD_LIBRARY_PATH} "${libdir}:${keep_ld}")
check_consumer("pkg-config, shared" ${WORK_DIR}/consumer_pc)
check_links("pkg-config, shared" ${WORK_DIR}/consumer_pc SHARED)
set(ENV{LD_LIBRARY_PATH} "${keep_ld}")

# 3. pkg-config --static with plasa-static: libplasa.a by full path plus what it
#    needs; the binary runs without the prefix on the library path.
run("pkg-config --static plasa-static" ${PKG_CONFIG} --static --cflags --libs plasa-static)
separate_arguments(pc UNIX_COMMAND "${run_out}")
if(NOT "${libdir}/libplasa.a" IN_LIST pc)
  message(FATAL_ERROR "plasa-static.pc does not name ${libdir}/libplasa.a: ${run_out}")
endif()
run("cc with pkg-config --static" ${C_COMPILER} ${c_flags} ${WORK_DIR}/src/consumer.c
    -o ${WORK_DIR}/consumer_pc_static ${pc} -lm)
check_consumer("pkg-config --static plasa-static" ${WORK_DIR}/consumer_pc_static)
check_links("pkg-config --static plasa-static" ${WORK_DIR}/consumer_pc_static STATIC)

# 4. plasa-train, installed in bin/.
if(TRAIN)
  set(train ${prefix}/bin/plasa-train)
  if(NOT EXISTS ${train})
    message(FATAL_ERROR "not installed: bin/plasa-train")
  endif()
  run("bin/plasa-train --help" ${train} --help)
  if(NOT run_out MATCHES "--steps")
    message(FATAL_ERROR "bin/plasa-train --help printed no --steps:\n${run_out}")
  endif()
  check_links("bin/plasa-train" ${train} STATIC)
endif()

# 5. plasa_mpi: header, libraries, plasa-mpi.pc; a consumer on 2 ranks.
if(MPIRUN)
  foreach(f include/plasa_mpi.h ${LIBDIR}/libplasa_mpi.a ${LIBDIR}/pkgconfig/plasa-mpi.pc)
    if(NOT EXISTS ${prefix}/${f})
      message(FATAL_ERROR "not installed: ${f}")
    endif()
  endforeach()
  set(ENV{PKG_CONFIG_PATH} ${libdir}/pkgconfig)
  run("pkg-config --cflags --libs plasa-mpi" ${PKG_CONFIG} --cflags --libs plasa-mpi)
  separate_arguments(pc UNIX_COMMAND "${run_out}")
  if(NOT "-lplasa_mpi" IN_LIST pc OR NOT "-lmpi" IN_LIST pc OR NOT "-lplasa" IN_LIST pc)
    message(FATAL_ERROR "plasa-mpi.pc should give -lplasa_mpi, -lplasa and MPI: ${run_out}")
  endif()
  configure_file(${SRC_DIR}/consumer_mpi.c ${WORK_DIR}/src/consumer_mpi.c COPYONLY)
  run("cc with pkg-config plasa-mpi" ${C_COMPILER} ${c_flags} ${WORK_DIR}/src/consumer_mpi.c
      -o ${WORK_DIR}/consumer_mpi ${pc} -lm)
  set(ENV{LD_LIBRARY_PATH} "${libdir}:${keep_ld}")
  run("consumer_mpi on 2 ranks" ${MPIRUN} --oversubscribe --allow-run-as-root -np 2
      ${WORK_DIR}/consumer_mpi)
  if(NOT run_out MATCHES "consumer_mpi: 2 ranks, mean gradient 0.5: ok")
    message(FATAL_ERROR "consumer_mpi: unexpected output: ${run_out}")
  endif()
  message(STATUS "pkg-config plasa-mpi: ${run_out}")
  check_links("pkg-config plasa-mpi" ${WORK_DIR}/consumer_mpi SHARED)
  run("ldd consumer_mpi" ${LDD} ${WORK_DIR}/consumer_mpi)
  if(NOT run_out MATCHES "libplasa_mpi\\.so[^\n]*=> ${libdir}/libplasa_mpi\\.so")
    message(FATAL_ERROR "consumer_mpi should load ${libdir}/libplasa_mpi.so:\n${run_out}")
  endif()
  set(ENV{LD_LIBRARY_PATH} "${keep_ld}")
endif()
